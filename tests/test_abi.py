"""The kernel contract (mirror/abi.py): what is read from bpf/mirror.h, the layouts stated
in Python, and the refusal to start when the compiled C and the Python layouts differ."""
from __future__ import annotations

import shutil
import struct

import pytest

from mirror import abi

@pytest.mark.unit
def test_enums_and_numbers_come_from_the_header():
    assert abi.COUNTERS[0] == "packets" and "events_lost" in abi.COUNTERS
    assert abi.DIRECTIONS == ("ingress", "egress")
    assert abi.CUT_REASONS == {1: "flow_packets", 2: "flow_bytes", 4: "cpu_rate"}
    assert abi.APP_PROTOS == {1: "h1", 2: "h2", 3: "grpc"}
    assert (abi.STATUS_CODES, abi.MIN_HTTP_STATUS) == (1000, 100)
    assert abi.DEFAULT_REQUEST_BYTES == 512 and abi.DEFAULT_MAX_FLOWS == 65536


@pytest.mark.unit
def test_enum_reader_follows_explicit_values(tmp_path, monkeypatch):
    (tmp_path / "mirror.h").write_text(
        "enum demo {\n    D_A = 3, /* a, b */\n    D_B,\n    D_C = 0x10,\n    D_D,\n};\n"
        "#define DEMO_N 12ULL\n")
    monkeypatch.setenv("MIRROR_BPF_DIR", str(tmp_path))
    assert abi.enum("demo") == {"D_A": 3, "D_B": 4, "D_C": 16, "D_D": 17}
    assert abi.define("DEMO_N") == 12
    with pytest.raises(abi.UsageError, match="no enum absent"):
        abi.enum("absent")


@pytest.mark.unit
def test_layouts_have_the_sizes_of_the_c_structs():
    assert abi.FLOW_KEY.size == 40 and abi.CONN.size == 152 and abi.CONN_HPACK.size == 64
    assert abi.CONN.offset("hpack") == 88
    assert abi.CONN.offset("last_ns") == 56     # a packet touches the first 64 bytes
    assert abi.IFACE_STATS.size == 136 and abi.EVENT_HEAD.size == 80
    assert abi.event_layout(512).size == 592
    assert abi.KEPT_REQUEST_HEAD.size == 40 and abi.MIRROR_CONFIG.size == 56


@pytest.mark.unit
def test_decode_names_fields_and_groups_arrays():
    raw = struct.pack("=8QI4x8Q", *range(1, 9), 7, *range(11, 19))
    v = abi.IFACE_STATS.decode(raw)
    assert v["responses"] == (1, 2, 3, 4, 5, 6) and v["mirrored_bytes"] == 8
    assert v["ifindex"] == 7 and v["grpc_responses"] == (17, 18)


@pytest.mark.testrun
def test_loading_refuses_a_layout_changed_on_one_side(tmp_path, monkeypatch):
    """A field added to struct conn in C and not in mirror/abi.py: the classifier
    compiles, and loading it refuses with the struct named, before anything is
    attached."""
    from mirror.bpfprog import Classifier
    changed = tmp_path / "bpf"
    shutil.copytree(abi.bpf_dir(), changed)
    header = changed / "mirror.h"
    text = header.read_text()
    assert "    __u64 bytes;            /* 80 */" in text
    header.write_text(text.replace("    __u64 bytes;            /* 80 */",
                                   "    __u64 bytes;\n    __u64 added;", 1))
    monkeypatch.setenv("MIRROR_BPF_DIR", str(changed))
    with pytest.raises(abi.ContractMismatch, match="struct conn .* 160 bytes as "
                       "compiled, 152 here"):
        Classifier(max_flows=64)
