"""The raw bpf(2) system call: the one place that knows its number on each architecture,
the parts of `union bpf_attr` this project uses (include/uapi/linux/bpf.h), and the
possible-CPU count that sizes every per-CPU map value.

bcc covers loading and most map access; what it lacks or makes slow goes through here:
BPF_PROG_TEST_RUN, batched and atomic map operations, tcx links (BPF_LINK_CREATE, and
BPF_PROG_QUERY behind `mirror status`), and for the bench BPF_ENABLE_STATS and a
program's source lines by JIT offset (its profile in traffic). The
loader (mirror.bpfprog), the tcx hook (mirror.tcx), the bench and the tests all call it
from here."""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

# __NR_bpf by `uname -m` of the kernel, for a process of the kernel's own word size.
# Debian builds bcc for each of these.
_SYSCALL_BY_MACHINE = {
    "x86_64": 321, "aarch64": 280, "ppc64le": 361, "ppc64": 361, "s390x": 351,
    "riscv64": 280, "loongarch64": 280, "mips64": 5315,      # mips64: the n64 ABI
    "i386": 357, "i486": 357, "i586": 357, "i686": 357,
    "armv6l": 386, "armv7l": 386, "armv8l": 386,               # 32-bit ARM, EABI
}
# A 32-bit process on a 64-bit kernel (i386 on x86_64, armhf on aarch64, mips o32)
# calls the 32-bit table.
_SYSCALL_32_ON_64 = {"x86_64": 357, "aarch64": 386, "mips64": 4355}


def syscall_number(machine: str | None = None, pointer_bytes: int | None = None) -> int:
    """__NR_bpf for this process (or for the given `uname -m` and pointer size)."""
    machine = machine or platform.machine()
    pointer_bytes = pointer_bytes or struct.calcsize("P")
    if pointer_bytes == 4 and machine in _SYSCALL_32_ON_64:
        return _SYSCALL_32_ON_64[machine]
    try:
        return _SYSCALL_BY_MACHINE[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"bpf(2): no syscall number known for architecture "
                      f"{machine!r}; add it to mirror/bpfsys.py") from None


def parse_cpu_list(text: str) -> list[int]:
    """The CPUs of a kernel CPU list such as "0-3,8,10-11" (the format of
    /sys/devices/system/cpu/possible)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(cpus))


def possible_cpus() -> int:
    """How many value slots a per-CPU map has: the kernel copies one per possible CPU
    (for_each_possible_cpu), so a sparse mask such as "0-1,4-5" gives 4, not 6."""
    with open("/sys/devices/system/cpu/possible") as f:
        return len(parse_cpu_list(f.read()))


# --- commands and attribute layouts -------------------------------------------------------

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_BTF_GET_FD_BY_ID = 19
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28
BPF_ENABLE_STATS = 32

BPF_NOEXIST = 1
BPF_STATS_RUN_TIME = 0


class TestRunAttr(ctypes.Structure):
    """BPF_PROG_TEST_RUN."""
    __test__ = False        # not a pytest class
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
    ]


class MapCreateAttr(ctypes.Structure):
    """BPF_MAP_CREATE, its first fields."""
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32)]


class ElemAttr(ctypes.Structure):
    """BPF_MAP_*_ELEM and BPF_MAP_GET_NEXT_KEY (`value` is `next_key` there)."""
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class BatchAttr(ctypes.Structure):
    """BPF_MAP_*_BATCH."""
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class LinkCreateAttr(ctypes.Structure):
    """BPF_LINK_CREATE for a tcx link."""
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("relative_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


class QueryAttr(ctypes.Structure):
    """BPF_PROG_QUERY (with the tcx fields of Linux 6.6: link ids, revision)."""
    _fields_ = [("target_ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("prog_attach_flags", ctypes.c_uint64),
                ("link_ids", ctypes.c_uint64), ("link_attach_flags", ctypes.c_uint64),
                ("revision", ctypes.c_uint64)]


class IdAttr(ctypes.Structure):
    """BPF_*_GET_NEXT_ID and BPF_*_GET_FD_BY_ID."""
    _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class InfoAttr(ctypes.Structure):
    """BPF_OBJ_GET_INFO_BY_FD."""
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class ProgInfo(ctypes.Structure):
    """struct bpf_prog_info up to and around its name."""
    _fields_ = [("_head", ctypes.c_uint8 * 64), ("name", ctypes.c_char * 16),
                ("_rest", ctypes.c_uint8 * 160)]


class ProgLineInfo(ctypes.Structure):
    """struct bpf_prog_info up to its line info: where each source line's code starts in
    the JIT image (the bench's profile reads it)."""
    _u32, _u64 = ctypes.c_uint32, ctypes.c_uint64
    _fields_ = [("type", _u32), ("id", _u32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", _u32), ("xlated_prog_len", _u32),
                ("jited_prog_insns", _u64), ("xlated_prog_insns", _u64), ("load_time", _u64),
                ("created_by_uid", _u32), ("nr_map_ids", _u32), ("map_ids", _u64),
                ("name", ctypes.c_char * 16), ("ifindex", _u32), ("gpl_compatible", _u32),
                ("netns_dev", _u64), ("netns_ino", _u64),
                ("nr_jited_ksyms", _u32), ("nr_jited_func_lens", _u32),
                ("jited_ksyms", _u64), ("jited_func_lens", _u64),
                ("btf_id", _u32), ("func_info_rec_size", _u32), ("func_info", _u64),
                ("nr_func_info", _u32), ("nr_line_info", _u32), ("line_info", _u64),
                ("jited_line_info", _u64), ("nr_jited_line_info", _u32),
                ("line_info_rec_size", _u32), ("jited_line_info_rec_size", _u32)]


class BtfInfo(ctypes.Structure):
    """struct bpf_btf_info."""
    _fields_ = [("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32),
                ("id", ctypes.c_uint32), ("name", ctypes.c_uint64),
                ("name_len", ctypes.c_uint32), ("kernel_btf", ctypes.c_uint32)]


# --- the call -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_BPF = syscall_number()


def call(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(cmd, attr): the result, or -errno (no exception: for loops where ENOENT is an
    ordinary answer)."""
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return ret if ret >= 0 else -ctypes.get_errno()


def check(cmd: int, attr: ctypes.Structure, what: str = "bpf") -> int:
    """bpf(cmd, attr); raises OSError naming `what` on failure."""
    ret = call(cmd, attr)
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


@dataclass
class TestRun:
    __test__ = False        # not a pytest class
    retval: int         # as the signed int a tc program returns
    duration_ns: int    # kernel-timed mean per repetition
    data_out: bytes


# struct __sk_buff as BPF_PROG_TEST_RUN takes it for a tc program (include/uapi/linux/bpf.h):
# only a few fields may be set, among them these two.
SKB_CTX_SIZE = 192
SKB_INGRESS_IFINDEX_OFF = 36
SKB_IFINDEX_OFF = 40


def skb_ctx(ifindex: int = 0, ingress_ifindex: int = 0) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN: the device the packet is on (the kernel
    needs a real one of that index, and takes it only above 1: 0 and 1 both mean lo) and
    the one it came in through."""
    ctx = bytearray(SKB_CTX_SIZE)
    ctx[SKB_INGRESS_IFINDEX_OFF:SKB_INGRESS_IFINDEX_OFF + 4] = ingress_ifindex.to_bytes(4, "little")
    ctx[SKB_IFINDEX_OFF:SKB_IFINDEX_OFF + 4] = ifindex.to_bytes(4, "little")
    return bytes(ctx)


def test_run(prog_fd: int, frame: bytes, repeat: int = 1, ctx: bytes | None = None) -> TestRun:
    """Runs a loaded sched_cls program on one frame with BPF_PROG_TEST_RUN, on the CPU
    the calling thread is on; `ctx`: a struct __sk_buff (skb_ctx())."""
    if len(frame) < 14:
        raise ValueError("BPF_PROG_TEST_RUN needs a full Ethernet header (14 bytes)")
    data_in = ctypes.create_string_buffer(bytes(frame), len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame),
                       data_size_out=ctypes.sizeof(data_out),
                       data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out),
                       repeat=repeat)
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        attr.ctx_in, attr.ctx_size_in = ctypes.addressof(ctx_in), len(ctx)
    check(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    retval = ctypes.c_int32(attr.retval).value
    return TestRun(retval, attr.duration, data_out.raw[:attr.data_size_out])


test_run.__test__ = False   # not a pytest test function

_BATCH = 4096


def batch_lookup(map_fd: int, key_size: int, value_size: int, per_cpu: bool = True):
    """Yields the entries of a hash or array map a batch at a time, as (keys, values,
    count): `keys` holds `count` keys of key_size bytes back to back, `values` one
    value_size slot per possible CPU for each key (one slot when not per_cpu). One
    BPF_MAP_LOOKUP_BATCH reads 4096 entries: a full 65536-flow map reads in tens of ms,
    where a per-key walk takes seconds."""
    slots = possible_cpus() if per_cpu else 1
    keys = ctypes.create_string_buffer(key_size * _BATCH)
    values = ctypes.create_string_buffer(value_size * slots * _BATCH)
    token = ctypes.create_string_buffer(max(key_size, 8))      # opaque batch position
    first = True
    while True:
        attr = BatchAttr(in_batch=0 if first else ctypes.addressof(token),
                         out_batch=ctypes.addressof(token), keys=ctypes.addressof(keys),
                         values=ctypes.addressof(values), count=_BATCH, map_fd=map_fd)
        ret = call(BPF_MAP_LOOKUP_BATCH, attr)
        if ret < 0 and ret != -errno.ENOENT:
            raise OSError(-ret, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(-ret)}")
        if attr.count:
            yield keys.raw, values.raw, attr.count
        if ret == -errno.ENOENT:
            return
        first = False


def batch_update(map_fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Writes `count` entries (keys and values back to back) in BPF_MAP_UPDATE_BATCH
    calls: zeroing a 65536-slot array takes a few calls instead of 65536."""
    kbuf = ctypes.create_string_buffer(keys, len(keys))
    vbuf = ctypes.create_string_buffer(values, len(values))
    ksize, vsize = len(keys) // count, len(values) // count
    done = 0
    while done < count:
        attr = BatchAttr(keys=ctypes.addressof(kbuf) + done * ksize,
                         values=ctypes.addressof(vbuf) + done * vsize,
                         count=count - done, map_fd=map_fd)
        ret = call(BPF_MAP_UPDATE_BATCH, attr)
        done += attr.count
        if ret < 0:
            raise OSError(-ret, f"BPF_MAP_UPDATE_BATCH: {os.strerror(-ret)} after {done} "
                          f"of {count} entries")


def lookup_and_delete(map_fd: int, key: bytes, value_len: int) -> bytes | None:
    """Reads and deletes one entry atomically; None when it is not there."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_len)
    attr = ElemAttr(map_fd=map_fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf))
    if call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, attr) < 0:
        return None
    return vbuf.raw


def update(map_fd: int, key: bytes, value: bytes, flags: int = 0) -> bool:
    """Writes one entry; False when the kernel refused (e.g. BPF_NOEXIST and it exists)."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    attr = ElemAttr(map_fd=map_fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf),
                    flags=flags)
    return call(BPF_MAP_UPDATE_ELEM, attr) >= 0


def enable_stats() -> int:
    """Turns on run-time statistics (run_time_ns, run_cnt) of every program for as long
    as the returned fd is open; the kernel turns them off when it closes, however the
    process ends."""
    attr = ctypes.c_uint32(BPF_STATS_RUN_TIME)
    ret = _libc.syscall(SYS_BPF, BPF_ENABLE_STATS, ctypes.byref(attr), 4)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    return ret


def obj_info(fd: int, info: ctypes.Structure) -> None:
    """Fills `info` (LinkInfo, ProgInfo) for a BPF object's fd."""
    check(BPF_OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                           info=ctypes.addressof(info)),
          "BPF_OBJ_GET_INFO_BY_FD")


@dataclass
class SourceLine:
    offset: int     # where the line's code starts, in bytes into the program's JIT image
    file: str       # as the compiler named it (bcc names the main file main.c)
    line: int
    text: str       # the source line, as kept in the program's BTF


def jited_source_lines(prog_fd: int) -> tuple[str, list[SourceLine]]:
    """The program's symbol as perf and /proc/kallsyms name it (bpf_prog_<tag>_<name>) and
    its source lines by JIT offset, sorted: what a sampled instruction pointer inside the
    program was running. Empty when the program was loaded without BTF line info."""
    info = ProgLineInfo()
    obj_info(prog_fd, info)
    symbol = f"bpf_prog_{bytes(info.tag).hex()}_{info.name.decode()}"
    n, rec, jrec = info.nr_line_info, info.line_info_rec_size, info.jited_line_info_rec_size
    if not n or info.nr_jited_line_info != n or not info.nr_jited_ksyms:
        return symbol, []
    lines = ctypes.create_string_buffer(n * rec)
    addrs = ctypes.create_string_buffer(info.nr_jited_line_info * jrec)
    ksyms = (ctypes.c_uint64 * info.nr_jited_ksyms)()
    want = ProgLineInfo(nr_line_info=n, line_info=ctypes.addressof(lines),
                        line_info_rec_size=rec, jited_line_info=ctypes.addressof(addrs),
                        nr_jited_line_info=n, jited_line_info_rec_size=jrec,
                        nr_jited_ksyms=info.nr_jited_ksyms, jited_ksyms=ctypes.addressof(ksyms))
    obj_info(prog_fd, want)
    strings = _btf_strings(info.btf_id)
    start = ksyms[0]        # the main function's address: line info covers it first

    def text(off: int) -> str:
        end = strings.find(b"\0", off)
        return strings[off:end].decode(errors="replace")

    out = []
    for i in range(n):
        _insn, file_off, line_off, line_col = struct.unpack_from("IIII", lines, i * rec)
        (addr,) = struct.unpack_from("Q", addrs, i * jrec)
        out.append(SourceLine(addr - start, text(file_off), line_col >> 10,
                              text(line_off).strip()))
    out.sort(key=lambda sl: sl.offset)
    return symbol, out


def _btf_strings(btf_id: int) -> bytes:
    """The string section of a loaded BTF object (struct btf_header, include/uapi/linux/btf.h)."""
    fd = check(BPF_BTF_GET_FD_BY_ID, IdAttr(start_id=btf_id), "BPF_BTF_GET_FD_BY_ID")
    try:
        probe = BtfInfo()
        obj_info(fd, probe)
        raw = ctypes.create_string_buffer(probe.btf_size)
        obj_info(fd, BtfInfo(btf=ctypes.addressof(raw), btf_size=probe.btf_size))
    finally:
        os.close(fd)
    hdr_len, str_off, str_len = struct.unpack_from("=I8xII", raw, 4)
    return raw.raw[hdr_len + str_off:hdr_len + str_off + str_len]
