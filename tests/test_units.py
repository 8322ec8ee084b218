"""Pure Python: trigger specs, flow keys, the config file, the bpf(2) syscall table and
the CPU list parser."""
from __future__ import annotations

import pytest

from mirror import bpfsys
from mirror.config import read_config
from mirror.errors import UsageError
from mirror.flowkey import FlowKey
from mirror.trigger import describe, parse_trigger

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("spec,codes", [
    ("5xx", set(range(500, 600))),
    ("500", {500}),
    ("500-504", {500, 501, 502, 503, 504}),
    ("429,5xx", {429} | set(range(500, 600))),
    (" 404 , 503 ", {404, 503}),
    ("4XX", set(range(400, 500))),
    ("none", set()),
    ("100-101,599", {100, 101, 599}),
])
def test_trigger_specs(spec, codes):
    assert parse_trigger(spec) == codes


@pytest.mark.parametrize("spec,msg", [
    ("", "empty trigger spec"),
    ("6xx", "cannot read '6xx'"),
    ("5x", "cannot read '5x'"),
    ("600", "outside 100-599"),
    ("099", "outside 100-599"),
    ("504-500", "runs backwards"),
    ("500,,", "cannot read ''"),
    ("abc", "cannot read 'abc'"),
])
def test_bad_trigger_specs_name_the_problem(spec, msg):
    with pytest.raises(UsageError, match=msg):
        parse_trigger(spec)


def test_describe_round_trips():
    for spec in ("5xx", "404", "429,5xx", "500-504", "none", "1xx,3xx,404-406"):
        assert parse_trigger(describe(parse_trigger(spec))) == parse_trigger(spec)
    assert describe(parse_trigger("429,5xx")) == "429,5xx"
    assert describe(parse_trigger("500-502,404")) == "404,500-502"


def test_flow_key_is_direction_free_and_round_trips():
    a = FlowKey.from_endpoints("198.18.0.2", 80, "198.18.0.1", 40000)
    b = FlowKey.from_endpoints("198.18.0.1", 40000, "198.18.0.2", 80)
    assert a == b and a.addr_lo == "198.18.0.1" and a.port_lo == 40000
    assert FlowKey.from_bytes(a.to_bytes()) == a
    assert len(a.to_bytes()) == 40
    # Same address on both ends (loopback): the port decides.
    c = FlowKey.from_endpoints("198.18.0.1", 9000, "198.18.0.1", 80)
    assert (c.port_lo, c.port_hi) == (80, 9000)
    v6 = FlowKey.from_endpoints("2001:db8::2", 80, "2001:db8::1", 5555)
    assert v6.family == 6 and v6.addr_lo == "2001:db8::1"
    assert FlowKey.from_bytes(v6.to_bytes()) == v6
    assert str(v6) == "[2001:db8::1]:5555 <-> [2001:db8::2]:80"
    with pytest.raises(ValueError):
        FlowKey.from_endpoints("198.18.0.1", 1, "2001:db8::1", 2)


def test_config_file(tmp_path):
    cfg = tmp_path / "m.conf"
    cfg.write_text("# comment\ntrigger = '429,5xx'\nidle_timeout = 12.5\n")
    assert read_config(str(cfg)).as_dict() == {"trigger": "429,5xx", "idle_timeout": 12.5}
    cfg.write_text("triger = 5xx\n")
    with pytest.raises(UsageError, match="m.conf:1: expected"):
        read_config(str(cfg))
    for bad in ("-1", "0", "nan", "inf", "-inf", "1e308", "abc", ""):
        cfg.write_text(f"idle_timeout = {bad}\n")
        with pytest.raises(UsageError, match="m.conf:1: idle_timeout"):
            read_config(str(cfg))
    cfg.write_text("trigger = 7xx\n")
    with pytest.raises(UsageError, match="m.conf:1: .*7xx"):
        read_config(str(cfg))
    with pytest.raises(UsageError, match="cannot read config"):
        read_config(str(tmp_path / "missing.conf"))


@pytest.mark.parametrize("machine,pointer,number", [
    ("x86_64", 8, 321), ("aarch64", 8, 280), ("ppc64le", 8, 361), ("s390x", 8, 351),
    ("riscv64", 8, 280), ("loongarch64", 8, 280), ("mips64", 8, 5315), ("i686", 4, 357),
    ("armv7l", 4, 386),
    # 32-bit processes on 64-bit kernels use the 32-bit table
    ("x86_64", 4, 357), ("aarch64", 4, 386), ("mips64", 4, 4355),
])
def test_bpf_syscall_number_per_architecture(machine, pointer, number):
    assert bpfsys.syscall_number(machine, pointer) == number


def test_bpf_syscall_number_unknown_architecture_names_the_fix():
    with pytest.raises(OSError, match="no syscall number known.*'pdp11'.*bpfsys.py"):
        bpfsys.syscall_number("pdp11", 8)


@pytest.mark.parametrize("text,cpus", [
    ("0\n", [0]),
    ("0-1\n", [0, 1]),
    ("0-3,8\n", [0, 1, 2, 3, 8]),
    ("0-1,4-5", [0, 1, 4, 5]),          # sparse: 4 value slots, not 6
    ("0,2,4", [0, 2, 4]),
    ("0-127", list(range(128))),
])
def test_cpu_list_parser(text, cpus):
    assert bpfsys.parse_cpu_list(text) == cpus


def test_possible_cpus_matches_the_machine():
    text = open("/sys/devices/system/cpu/possible").read()
    assert bpfsys.possible_cpus() == len(bpfsys.parse_cpu_list(text)) >= 1
