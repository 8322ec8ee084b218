"""The kernel contract: every layout, enum and constant that the classifier (bpf/) and user
space share, stated once.

Enums and numbers are stated in C, in bpf/mirror.h, and read from it here (the counters'
names come from `enum counter`, the directions from `enum direction`, ...), so that the
header stays the one place that defines them. Struct layouts are stated here once, in
Python, as the readers of maps and events need them even where no program is loaded (a
flow key in a test, an event in a file), and they are checked against the types bcc
compiled when the classifier loads (`check_tables`): a field added in C and forgotten
here refuses to start with a message naming the struct, instead of decoding garbage.

bench/ and tests/ take their layouts from here too."""
from __future__ import annotations

import ctypes
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UsageError


def bpf_dir() -> Path:
    """Where the classifier's sources are: MIRROR_BPF_DIR when set; else the copy
    installed with the package (a wheel carries bpf/ as mirror/bpf); else the checkout's
    bpf/ beside mirror/."""
    env = os.environ.get("MIRROR_BPF_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    installed = here / "bpf"
    if (installed / "mirror.c").is_file():
        return installed
    return here.parent / "bpf"


@lru_cache(maxsize=None)
def _header(directory: str) -> str:
    path = Path(directory) / "mirror.h"
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the classifier's header {path}: {exc.strerror}; "
                         "set MIRROR_BPF_DIR to the directory holding bpf/mirror.h") from None


def header() -> str:
    return _header(str(bpf_dir()))


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def enum(name: str) -> dict[str, int]:
    """`enum NAME { A = 0, B, ... }` of bpf/mirror.h as {member: value}, in order."""
    m = re.search(rf"enum {name} \{{(.*?)\}};", _strip_comments(header()), re.S)
    if not m:
        raise UsageError(f"bpf/mirror.h has no enum {name}: the header and mirror/abi.py "
                         "are from different versions")
    out, value = {}, 0
    for item in m.group(1).split(","):
        member, _, explicit = (s.strip() for s in item.partition("="))
        if not member:
            continue
        if explicit:
            value = int(explicit, 0)
        out[member] = value
        value += 1
    return out


def define(name: str) -> int:
    """The integer value of `#define NAME value` in bpf/mirror.h."""
    m = re.search(rf"^#define {name}\s+(\S+)", header(), re.M)
    if not m:
        raise UsageError(f"bpf/mirror.h has no #define {name}: the header and "
                         "mirror/abi.py are from different versions")
    return int(m.group(1).rstrip("ULul"), 0)


def _names(enum_name: str, prefix: str) -> tuple[str, ...]:
    """An enum's members in value order, prefix removed and lower-cased (C_PACKETS ->
    packets); NR_* sentinels left out."""
    members = sorted((v, k) for k, v in enum(enum_name).items() if k.startswith(prefix))
    return tuple(k[len(prefix):].lower() for _, k in members)


# --- enums and numbers (bpf/mirror.h) -----------------------------------------------------
COUNTERS = list(_names("counter", "C_"))
DIRECTIONS = _names("direction", "DIR_")                 # ("ingress", "egress")
# enum cut_reason bits (flow_value.cut, error_event.cut), as the metrics name them.
CUT_REASONS = {v: k[len("CUT_"):].lower() for k, v in enum("cut_reason").items()}
# enum app_proto as events and metrics name it (grpc: the status is the grpc-status code).
_PROTO_LABELS = {"HTTP1": "h1", "HTTP2": "h2", "GRPC": "grpc"}
APP_PROTOS = {v: _PROTO_LABELS[k[len("PROTO_"):]] for k, v in enum("app_proto").items()}
STATUS_CODES = define("STATUS_CODES")
MIN_HTTP_STATUS = define("MIN_HTTP_STATUS")
IFACE_SLOTS = define("IFACE_SLOTS")
MAX_MONITORED = define("MAX_MONITORED")
DEFAULT_MAX_FLOWS = define("DEFAULT_MAX_FLOWS")
DEFAULT_REQUEST_BYTES = define("DEFAULT_REQUEST_BYTES")
DEFAULT_MAX_EVENTS_PER_CONN = define("DEFAULT_MAX_EVENTS_PER_CONN")
CONN_WAYS = define("CONN_WAYS")
ERROR_COUNT_KEYS = define("ERROR_COUNT_KEYS")
LOOPBACK_IFINDEX = define("LOOPBACK_IFINDEX")
CONN_FLAGS = {k[len("CONN_"):].lower(): v for k, v in enum("conn_flag").items()}
RESPONSE_BUCKETS = define("RESPONSE_BUCKETS")
# The response-time buckets' upper bounds, in seconds (RESPONSE_BOUNDS_NS in bpf/mirror.h).
RESPONSE_BOUNDS_S = tuple(
    int(x.rstrip("ULul")) / 1e9 for x in re.search(
        r"#define RESPONSE_BOUNDS_NS \{(.*?)\}", header(), re.S).group(1)
    .replace("\\", " ").split(","))
MARKS_MADE = enum("marks_index")["MARKS_MADE"]
MARKS_CLEARED = enum("marks_index")["MARKS_CLEARED"]
# Responses in iface_stats by class: 1xx..5xx, then any code outside 100-599.
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
# gRPC responses in iface_stats, by grpc-status: 0, then 1-16.
GRPC_CLASSES = ("ok", "error")

# Limits user space puts on what it compiles in (not in the header: C takes any value).
MAX_REQUEST_BYTES = 4096
MAX_CONN_SLOTS = 1 << 24
RATE_WINDOW_NS = 10**9      # the rate windows of --max-clones-per-second and events

# tc verdicts (linux/pkt_cls.h): the classifier returns UNSPEC for every packet.
TC_ACT_UNSPEC = -1
TC_ACT_OK = 0
TC_ACT_SHOT = 2


def cut_reasons(bits: int) -> list[str]:
    return [name for bit, name in CUT_REASONS.items() if bits & bit]


# --- struct layouts --------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """One C struct as user space reads it: fields in order, each a struct-module format
    (padding fields are named None). `order` is "=" (native) or "!" (network: the flow key's
    ports are in network byte order, its addresses raw bytes)."""
    c_name: str
    order: str
    fields: tuple[tuple[str | None, str], ...]

    @property
    def struct(self) -> struct.Struct:
        return _compiled(self)

    @property
    def size(self) -> int:
        return self.struct.size

    def offset(self, name: str) -> int:
        return self.offsets()[name]

    def offsets(self) -> dict[str, int]:
        out, fmt = {}, self.order
        for name, f in self.fields:
            if name is not None:
                out[name] = struct.calcsize(fmt)
            fmt += f
        return out

    def unpack_from(self, buf, offset: int = 0) -> tuple:
        return self.struct.unpack_from(buf, offset)

    def decode(self, buf, offset: int = 0) -> dict:
        """{field: value} of the struct at buf[offset:]; an array field (\"6Q\") as a
        tuple, padding left out."""
        values = iter(self.unpack_from(buf, offset))
        out = {}
        for name, f in self.fields:
            if f.endswith("x"):
                continue
            n = int(f[:-1]) if f[:-1].isdigit() and f[-1] != "s" else 1
            got = tuple(next(values) for _ in range(n)) if n > 1 else next(values)
            if name is not None:
                out[name] = got
        return out

    def check(self, ctype, where: str) -> None:
        """Raises ContractMismatch unless `ctype` (a ctypes type bcc made from the
        compiled C) has this layout's size and each named field at this layout's
        offset."""
        problems = []
        if ctypes.sizeof(ctype) != self.size:
            problems.append(f"{ctypes.sizeof(ctype)} bytes as compiled, {self.size} here")
        compiled = {n: getattr(ctype, n).offset for n, *_ in getattr(ctype, "_fields_", ())}
        for name, off in self.offsets().items():
            if name not in compiled:
                problems.append(f"no field {name} as compiled")
            elif compiled[name] != off:
                problems.append(f"{name} at offset {compiled[name]} as compiled, {off} here")
        if problems:
            raise ContractMismatch(
                f"struct {self.c_name} ({where}) differs between bpf/mirror.h and "
                f"mirror/abi.py: {'; '.join(problems)}. The classifier and the Python "
                "package are from different versions: reinstall them together (or fix "
                "the layout in mirror/abi.py after changing the header)")


@lru_cache(maxsize=None)
def _compiled(layout: Layout) -> struct.Struct:
    return struct.Struct(layout.order + "".join(f for _, f in layout.fields))


class ContractMismatch(UsageError):
    """The compiled classifier and mirror/abi.py disagree on a layout."""


FLOW_KEY = Layout("flow_key", "!", (
    ("addr_lo", "16s"), ("addr_hi", "16s"), ("port_lo", "H"), ("port_hi", "H"),
    ("family", "B"), (None, "3x")))

# A multiple of 8: the slots of a per-CPU value are not padded.
# struct conn: its key is struct conn_key (the flow key, then the ifindex) as raw bytes:
# the flow key's ports are in network order, the rest native.
CONN_KEY_SIZE = FLOW_KEY.size + 4
# struct conn_hpack: the server's HPACK encoder as the classifier follows it.
HPACK_NAMED = define("HPACK_NAMED")
HPACK_STATES = {v: k[len("HPACK_"):].lower() for k, v in enum("hpack_state").items()}
CONN_HPACK = Layout("conn_hpack", "=", (
    ("next_seq", "I"), ("inserted", "I"), ("floor", "I"), ("state", "B"), ("next", "B"),
    (None, "2x"), ("named_at", f"{HPACK_NAMED}I"), ("named_what", f"{HPACK_NAMED}H")))
CONN = Layout("conn", "=", (
    ("key", f"{CONN_KEY_SIZE}s"), ("flags", "B"), ("cut", "B"), ("status", "H"),
    ("gen", "I"), ("events", "I"), ("last_ns", "Q"), ("first_ns", "Q"), ("packets", "Q"),
    ("bytes", "Q"), ("hpack", f"{CONN_HPACK.size}s")))

IFACE_STATS = Layout("iface_stats", "=", (
    ("responses", f"{len(STATUS_CLASSES)}Q"), ("mirrored_packets", "Q"),
    ("mirrored_bytes", "Q"), ("ifindex", "I"), (None, "4x"),
    ("h2_responses", f"{len(STATUS_CLASSES)}Q"), ("grpc_responses", f"{len(GRPC_CLASSES)}Q")))

# struct kept_request up to data[] (REQUEST_BYTES as compiled follow).
KEPT_REQUEST_HEAD = Layout("kept_request", "=", (
    ("request_ns", "Q"), ("slot", "I"), ("gen", "I"), ("frame_len", "I"), ("len", "I"),
    ("direction", "B"), (None, "7x"), ("seq", "Q")))

# struct error_event up to data[]: the response, the key, the request.
EVENT_HEAD = Layout("error_event", "=", (
    ("response_ns", "Q"), ("request_ns", "Q"), ("key", f"{FLOW_KEY.size}s"),
    ("ifindex", "I"), ("status", "H"), ("direction", "B"), ("proto", "B"),
    ("new_flow", "B"), ("server_is_lo", "B"), ("cut", "B"), ("request_direction", "B"),
    ("request_frame_len", "I"), ("request_len", "I"), (None, "4x")))

MIRROR_CONFIG = Layout("mirror_config", "=", (
    ("debug_ifindex", "I"), ("request_bytes", "I"), ("max_packets_per_flow", "I"),
    ("max_clones_per_window", "I"), ("max_bytes_per_flow", "Q"), ("rate_window_ns", "Q"),
    ("max_events_per_window", "I"), ("max_events_per_conn", "I"), ("idle_ns", "Q"),
    ("hash_seed", "I"), (None, "4x")))

RATE_WINDOW = Layout("rate_window", "=", (("start_ns", "Q"), ("count", "Q")))

ERROR_COUNT_KEY = Layout("error_count_key", "=", (
    ("ifindex", "I"), ("status", "H"), ("proto", "B"), (None, "x")))


def with_data(head: Layout, request_capacity: int) -> Layout:
    """A struct whose data[] holds REQUEST_BYTES = request_capacity, as compiled."""
    return Layout(head.c_name, head.order, head.fields + (("data", f"{request_capacity}s"),))


def event_layout(request_capacity: int) -> Layout:
    return with_data(EVENT_HEAD, request_capacity)


def request_capacity(request_bytes: int) -> int:
    """The request buffer compiled in: --request-bytes rounded up to 8 (at least 8, so
    that the array exists even with the snapshot off)."""
    return max(8, (request_bytes + 7) // 8 * 8)


def conn_slots(max_flows: int) -> int:
    """Slots of the connection array: --max-flows rounded up to a power of two (the
    index is a hash masked to it), at least two buckets."""
    return max(2 * CONN_WAYS, 1 << max(0, max_flows - 1).bit_length())


def request_slots(conn_slots: int) -> int:
    """Entries of the kept-request array: one per bucket of connection slots (a request
    lives only from itself to its response; one taken by another connection's costs its
    event the request, never the error)."""
    return conn_slots // CONN_WAYS


def table_layouts(request_capacity: int) -> dict[str, tuple[Layout | None, Layout | None]]:
    """map name -> (key layout, value layout) of the classifier's maps whose structs user
    space reads or writes (None: a plain integer or byte)."""
    return {
        "conns": (None, CONN),
        "requests": (None, with_data(KEPT_REQUEST_HEAD, request_capacity)),
        "event_scratch": (None, event_layout(request_capacity)),
        "iface_stats": (None, IFACE_STATS),
        "config": (None, MIRROR_CONFIG),
        "clone_rate": (None, RATE_WINDOW),
        "event_rate": (None, RATE_WINDOW),
        "errors": (ERROR_COUNT_KEY, None),
    }


def check_tables(bpf, request_capacity: int) -> None:
    """Checks every shared layout against the types bcc compiled (`bpf`: a bcc.BPF);
    ContractMismatch on the first difference. Per-CPU values are checked per CPU slot."""
    for name, (key_layout, value_layout) in table_layouts(request_capacity).items():
        table = bpf.get_table(name.encode())
        for layout, ctype, part in ((key_layout, table.Key, "key"),
                                    (value_layout, table.Leaf, "value")):
            if layout is None:
                continue
            if issubclass(ctype, ctypes.Array):     # a per-CPU value: one slot per CPU
                ctype = ctype._type_
            layout.check(ctype, f"the {part} of map {name}")
    counters = bpf.get_table(b"counters")
    compiled = counters.max_entries
    if compiled != len(COUNTERS):
        raise ContractMismatch(f"the counters map has {compiled} entries as compiled, "
                               f"{len(COUNTERS)} in enum counter as read from bpf/mirror.h")
