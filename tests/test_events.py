"""`mirror events` against a real controller: the filters on the control socket and on the
events file give the same events; `--follow` prints every event once, the last ones of a
controller that stops included, and ends with "controller PID stopped" and status 0; a
killed controller is said, with status 1."""
from __future__ import annotations

import json
import signal
import subprocess
import threading

import pytest

from helpers import (MirrorProcess, controller_ask, drop_link, env_with, mirror_cmd,
                     run_cli, wait_until)
from mirror.communityid import of_flow
from mirror.flowkey import FlowKey
from mirror.lab.client import send
from mirror.lab.netns import unique_name

pytestmark = pytest.mark.kernel


def same(e: dict) -> tuple:
    return e["time_unix"], e["client"], e["status"], e["community_id"], e["target"]


def all_read(state_dir):
    """Waits until the controller has read every event the kernel emitted."""
    wait_until(lambda: ((c := controller_ask(state_dir))["events_read"] >= c["events"], c),
               "every event read")


class Follower:
    """`mirror events --follow --json` in the background, its lines collected."""

    def __init__(self, env, *args: str):
        self.proc = subprocess.Popen(mirror_cmd("events", "--follow", "--json", *args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.events: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait_for(self, count: int) -> list[dict]:
        return wait_until(lambda: (len(self.events) >= count, self.events),
                          f"{count} events followed")

    def end(self) -> tuple[int, str]:
        """Its exit status and what it said on standard error (it must end by itself)."""
        rc = self.proc.wait(timeout=60)
        self.reader.join(10)
        return rc, self.proc.stderr.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def test_filters_on_the_socket_and_on_the_file(host, nginx, state_dir, tmp_path):
    env = env_with(MIRROR_STATE_DIR=state_dir)
    path = tmp_path / "events.jsonl"
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", unique_name("d"),
                      "--trigger", "404,5xx", "--events-file", str(path), env=env).start()
    try:
        first, _ = send(host.ns_v4, host.host_v4, ["/error"])
        send(host.ns_v4, host.host_v4, ["/missing"])
        send(host.ns_v4, host.host_v4, ["/error"])
        all_read(state_dir)
        cid = of_flow(FlowKey.from_endpoints(*first))
        cases = {
            (): 3,
            ("--status", "5xx"): 2,
            ("--status", "404"): 1,
            ("--status", "grpc-error"): 0,
            ("--iface", host.host_if, "--status", "500"): 2,
            ("--iface", "nothing*"): 0,
            ("--pod", "*"): 0,                  # a host veth: no pod behind it
            ("--community-id", cid): 1,
            ("--since", "10m"): 3,
            ("--until", "10m"): 0,
        }
        for args, expected in cases.items():
            live = run_cli("events", "--json", *args, env=env)
            from_file = run_cli("events", "--json", "--file", str(path), *args, env=env)
            assert live.returncode == 0 and from_file.returncode == 0, live.stderr + \
                from_file.stderr
            got = [json.loads(l) for l in live.stdout.splitlines()]
            assert len(got) == expected, (args, live.stdout)
            # The same events (the workload's answer may have come between the two).
            assert [same(e) for e in got] == [
                same(json.loads(l)) for l in from_file.stdout.splitlines()], args
        one = [json.loads(l) for l in run_cli("events", "--json", "--community-id", cid,
                                              env=env).stdout.splitlines()]
        assert one[0]["client"] == f"{first[0]}:{first[1]}" and one[0]["status"] == 500
        wrong = run_cli("events", "--status", "7xx", env=env)
        assert wrong.returncode == 2 and "--status" in wrong.stderr
    finally:
        assert m.stop() == 0, m.output


def test_follow_gets_the_last_events_of_a_stopping_controller(host, nginx, state_dir):
    """Events emitted just before SIGTERM are printed by the follower (the controller
    hands them over before its control socket closes), then "controller PID stopped",
    and the follower ends with status 0."""
    env = env_with(MIRROR_STATE_DIR=state_dir)
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", unique_name("d"),
                      env=env).start()
    follower = None
    try:
        send(host.ns_v4, host.host_v4, ["/error"])
        all_read(state_dir)
        follower = Follower(env, "--status", "500")
        assert [e["status"] for e in follower.wait_for(1)] == [500]
        for _ in range(5):
            send(host.ns_v4, host.host_v4, ["/error", "/missing"])
        all_read(state_dir)
        assert m.stop() == 0, m.output
        rc, err = follower.end()
        assert rc == 0, err
        assert len(follower.events) == 6, follower.events
        assert len({e["client"] for e in follower.events}) == 6
        assert f"controller {m.proc.pid} stopped" in err and "missed" not in err, err
    finally:
        if m.proc.poll() is None:
            m.stop()
        if follower:
            follower.kill()


def test_follow_says_a_killed_controller_vanished(host, nginx, state_dir):
    env = env_with(MIRROR_STATE_DIR=state_dir)
    dbg = unique_name("d")
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env).start()
    follower = Follower(env)
    try:
        send(host.ns_v4, host.host_v4, ["/error"])
        follower.wait_for(1)
        m.signal(signal.SIGKILL)
        m.proc.wait()
        rc, err = follower.end()
        assert rc == 1, err
        assert f"controller {m.proc.pid} stopped without cleaning up (killed?)" in err, err
    finally:
        m.kill()
        follower.kill()
        out = run_cli("detach", "--iface", host.host_if, env=env)
        assert out.returncode == 0, out.stderr
        drop_link(dbg)
