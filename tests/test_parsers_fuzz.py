"""The user-space parsers fed what nobody should write, with Hypothesis, on a bounded
budget (MIRROR_HYPOTHESIS_EXAMPLES examples per test, default 300; no example database
is kept, so a CI run leaves nothing behind): the --config file, the event decoder (whose
layout belongs to the kernel side: it is fed through its public face only, bytes of any
length) and the terminal escaping of what the network sends. (The capture sidecar's
index and pcap readers are fuzzed in tests/test_capture.py.)"""
from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.cliutil import printable
from mirror.config import FileSettings, read_config
from mirror.errors import UsageError
from mirror.events.follow import render_event
from mirror.events.record import Event

pytestmark = pytest.mark.unit

BUDGET = settings(max_examples=int(os.environ.get("MIRROR_HYPOTHESIS_EXAMPLES", "300")),
                  deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])

# Lines shaped like the file's (a key, an '=', a value), with the values a careless hand
# or a hostile one writes, mixed with anything at all.
KEYS = st.sampled_from(["trigger", "idle_timeout", "TRIGGER", "idle-timeout", "", "#x"])
VALUES = st.one_of(
    st.sampled_from(["5xx", "nan", "inf", "-inf", "1e308", "0", "-1", "30", "500-504",
                     "grpc:14", "'5xx'", '"30"', "none", "", "6xx", "1_0", "0x10"]),
    st.text(max_size=30), st.floats().map(repr), st.integers().map(str))
LINES = st.one_of(st.builds(lambda k, s, v: f"{k}{s}{v}", KEYS,
                            st.sampled_from([" = ", "=", " ", " == "]), VALUES),
                  st.text(max_size=60))


def check_settings(got: FileSettings) -> None:
    """What read_config returns is what the controller can use as it is."""
    if got.idle_timeout is not None:
        assert 0 < got.idle_timeout <= 30 * 86400
    if got.trigger is not None:
        assert got.codes is not None and all(isinstance(c, int) for c in got.codes)


@BUDGET
@given(st.lists(LINES, max_size=8))
def test_config_file_is_read_or_refused_in_one_line(tmp_path, lines):
    path = tmp_path / "mirror.conf"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        got = read_config(str(path))
    except UsageError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc), str(exc)   # one line
        return
    check_settings(got)


@BUDGET
@given(st.binary(max_size=4096))
def test_config_file_of_any_bytes(tmp_path, data):
    path = tmp_path / "mirror.conf"
    path.write_bytes(data)
    try:
        check_settings(read_config(str(path)))
    except UsageError:
        pass


RECORDS = st.one_of(st.binary(max_size=128), st.binary(min_size=64, max_size=1024))


@BUDGET
@given(RECORDS)
def test_event_decoder_on_any_bytes(raw):
    """A record from the ring buffer of any length and content: it is refused as too short
    (the events reader counts it and goes on), or it becomes an event whose JSON is one
    line of valid JSON and whose terminal line holds no control character."""
    try:
        event = Event.from_record(raw)
    except (struct.error, ValueError):
        return
    obj = event.to_json("eth0", 0, {"max_packets_per_flow": 1})
    line = json.dumps(obj)
    assert "\n" not in line and json.loads(line) == obj
    shown = render_event(obj)
    assert shown.isprintable(), repr(shown)


@BUDGET
@given(st.text())
def test_printable_escapes_every_control_and_keeps_the_rest(text):
    shown = printable(text)
    assert shown.isprintable() or not shown
    assert "\x1b" not in shown and "\r" not in shown and "\n" not in shown
    if text.isprintable() and "\\" not in text:
        assert shown == text
