"""What `mirror events` and `mirror capture --extract` select by (mirror.filters): times,
statuses, Community IDs and workload patterns, and the refusals of wrong values; and the
events file read back (`mirror events --file`), rotations included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mirror.errors import UsageError
from mirror.events.follow import Followed, Follower
from mirror.filters import (EventFilter, Statuses, WorkloadPatterns, check_community_id,
                            event_filter, parse_time, time_window)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_767_225_600.0       # 2026-01-01T00:00:00Z

POD = {"k8s.namespace.name": "shop", "k8s.pod.name": "checkout-7d9f",
       "k8s.container.name": "app,envoy", "container.runtime.name": "containerd"}


def event(**kw) -> dict:
    base = {"time": "2026-01-01T00:00:00.000000Z", "time_unix": NOW, "iface": "veth1a2b",
            "status": 503, "proto": "http1", "client": "198.18.0.1:40000",
            "server": "198.18.0.2:80", "community_id": "1:LQU9qZlK+B5F3KDmev6m5PMibrg="}
    return {**base, **kw}


@pytest.mark.parametrize("text, expected", [
    ("2026-01-01T00:00:00Z", NOW),
    ("2026-01-01T00:00:00.5Z", NOW + 0.5),
    ("2026-01-01T01:00:00+01:00", NOW),
    ("2026-01-01T00:00:00", NOW),              # no offset: UTC
    (str(int(NOW)), NOW),
    ("1767225600.25", NOW + 0.25),
    ("10m", NOW - 600),
    ("30s", NOW - 30),
    ("2h", NOW - 7200),
    ("1d", NOW - 86400),
])
def test_times(text, expected):
    assert parse_time(text, "--since", now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "10 minutes", "-5m", "nan", "inf", "", "10y"])
def test_wrong_times_name_the_flag(text):
    with pytest.raises(UsageError, match="--until"):
        parse_time(text, "--until", now=NOW)


def test_a_window_that_runs_backwards_is_refused():
    assert time_window("1h", "10m", now=NOW) == (NOW - 3600, NOW - 600)
    assert time_window(None, None) == (None, None)
    with pytest.raises(UsageError, match="after --until"):
        time_window("10m", "1h", now=NOW)


def test_community_ids():
    good = "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    assert check_community_id(good) == good
    for bad in ["LQU9qZlK+B5F3KDmev6m5PMibrg=", "1:abc", "2:LQU9qZlK+B5F3KDmev6m5PMibrg=",
                "1:LQU9qZlK+B5F3KDmev6m5PMibr!="]:
        with pytest.raises(UsageError, match="--community-id"):
            check_community_id(bad)


def test_statuses_take_the_trigger_syntax_and_keep_http_and_grpc_apart():
    s = Statuses.parse("5xx,grpc:unavailable")
    assert s.matches(503) and s.matches(14, "grpc")
    assert not s.matches(14) and not s.matches(503, "grpc") and not s.matches(404)
    assert not s.matches("503") and not s.matches(True) and not s.matches(None)
    assert Statuses.parse("grpc-error").matches(2, "grpc")
    assert not Statuses.parse("grpc-error").matches(0, "grpc")
    with pytest.raises(UsageError, match="--status"):
        Statuses.parse("7xx")
    with pytest.raises(UsageError, match="selects nothing"):
        Statuses.parse("none")


def test_workload_patterns():
    assert not WorkloadPatterns() and WorkloadPatterns().matches(None, None)
    assert WorkloadPatterns(pod=("checkout-*",)).matches(POD, "veth1")
    assert WorkloadPatterns(namespace=("shop",), container=("envoy",)).matches(POD, "veth1")
    assert not WorkloadPatterns(namespace=("shop",), container=("db",)).matches(POD, "v")
    # A repeated flag is any of its patterns; different flags must all hold.
    assert WorkloadPatterns(pod=("cart-*", "checkout-*")).matches(POD, "veth1")
    assert not WorkloadPatterns(pod=("checkout-*",), iface=("cali*",)).matches(POD, "veth1")
    assert WorkloadPatterns(iface=("veth*",)).matches({}, "veth1")
    # Shell patterns match whole names, case and all.
    assert not WorkloadPatterns(pod=("checkout",)).matches(POD, "veth1")
    assert not WorkloadPatterns(pod=("CHECKOUT-*",)).matches(POD, "veth1")
    # An unknown workload (a host interface, an answer still pending) is no pod's.
    assert not WorkloadPatterns(pod=("*",)).matches({}, "eth0")
    assert not WorkloadPatterns(pod=("*",)).matches({"mirror.workload.state": "pending"}, "v")
    # A podman pod and a Docker container's name.
    podman = {"container.runtime.name": "podman", "mirror.pod.name": "web",
              "container.name": "web-app"}
    assert WorkloadPatterns(pod=("web",), container=("web-*",)).matches(podman, "veth2")


def test_event_filter_holds_every_criterion_given():
    pod_event = event(**POD)
    assert EventFilter().matches(pod_event)
    flt = event_filter(namespace=["shop"], pod=["checkout-*"], iface=["veth*"],
                       status="5xx", since="2025-12-31T23:00:00Z", until=str(NOW),
                       community_id="1:LQU9qZlK+B5F3KDmev6m5PMibrg=", now=NOW)
    assert flt.matches(pod_event)
    for other in [event(**POD, status=404), event(**POD, time_unix=NOW + 1),
                  event(**POD, time_unix=NOW - 7200), event(**POD, iface="eth0"),
                  event(**POD, community_id="1:" + "A" * 27 + "="), event(),
                  {k: v for k, v in pod_event.items() if k != "time_unix"}]:
        assert not flt.matches(other), other


def test_a_follower_says_how_many_events_it_missed_and_why(capsys):
    """The gap arithmetic of `mirror events --follow` on the answers a controller gives
    (EventStream.window): events pushed out of the ones it keeps, and error responses the
    kernel kept from becoming events, each said on standard error with its count."""
    follower = Follower(EventFilter(), as_json=True, follow=True)
    known = Followed(pid=42)
    follower._gaps(known, {"first": 1, "last": 3, "kept": 1000, "kernel_lost": 0,
                           "kernel_held": 0})
    known.seq, known.asked = 3, True
    follower._gaps(known, {"first": 4, "last": 9, "kept": 1000, "kernel_lost": 0,
                           "kernel_held": 0})
    assert capsys.readouterr().err == ""
    known.seq = 9
    follower._gaps(known, {"first": 1510, "last": 2509, "kept": 1000, "kernel_lost": 7,
                           "kernel_held": 20})
    err = capsys.readouterr().err
    assert "1500 events of controller 42 missed" in err
    assert "7 error responses on controller 42 became no event: its ring buffer" in err
    assert "20 error responses on controller 42 became no event: held back" in err


def run_events(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirror", "events", *args], input=stdin,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_events_file_read_back_with_the_filters(tmp_path):
    """`mirror events --file`: the rotated file first, then the current one, filtered;
    lines that are not events (a cut last line) are counted on standard error."""
    path = tmp_path / "events.jsonl"
    (tmp_path / "events.jsonl.1").write_text(
        json.dumps(event(**POD, target="/old")) + "\n" + json.dumps(event(status=500)) + "\n")
    path.write_text(json.dumps(event(**POD, status=404)) + "\n"
                    + json.dumps(event(**POD, target="/new", time_unix=NOW + 5)) + "\n"
                    + '{"time": "2026-01-01T00:0')
    got = run_events("--file", str(path), "--json", "--pod", "checkout-*", "--status", "5xx")
    assert got.returncode == 0, got.stderr
    assert [json.loads(l)["target"] for l in got.stdout.splitlines()] == ["/old", "/new"]
    assert "1 line(s) that are not event objects skipped" in got.stderr
    text = run_events("--file", "-", "--since", str(NOW + 1),
                      stdin=path.read_text().splitlines()[1] + "\n")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        "2026-01-01T00:00:00.000000Z  veth1a2b shop/checkout-7d9f (app,envoy)  503  "
        "(request not seen)  -  198.18.0.1:40000 -> 198.18.0.2:80"]
    missing = run_events("--file", str(tmp_path / "nothing.jsonl"))
    assert missing.returncode == 1 and "No such file" in missing.stderr


def test_events_file_followed_across_rotations(tmp_path):
    """`mirror events --file PATH --follow` prints what is appended, and when PATH moves
    to PATH.1 (the controller's rotation) the old file's last lines and then the new
    file's: every line once, in order."""
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(event(target="/0")) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "events", "--file", str(path),
                             "--follow", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []
    arrived = threading.Condition()

    def read():
        for line in proc.stdout:
            with arrived:
                lines.append(json.loads(line)["target"])
                arrived.notify_all()

    def wait_for(count: int) -> list[str]:
        with arrived:
            assert arrived.wait_for(lambda: len(lines) >= count, timeout=30), lines
            return list(lines)

    threading.Thread(target=read, daemon=True).start()
    try:
        assert wait_for(1) == ["/0"]
        with path.open("a") as f:
            f.write(json.dumps(event(target="/1")) + "\n" + json.dumps(event(target="/2")))
        assert wait_for(2) == ["/0", "/1"]      # /2 has no newline yet
        with path.open("a") as f:
            f.write("\n" + json.dumps(event(target="/3")) + "\n")
        os.replace(path, str(path) + ".1")      # rotated, as mirror.events.file does
        path.write_text(json.dumps(event(target="/4")) + "\n")
        assert wait_for(5) == ["/0", "/1", "/2", "/3", "/4"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
