"""Races between controllers and with the host: names, shared debug interfaces,
`mirror status` across network namespaces."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from helpers import NEEDS_TCX, ROOT, MirrorProcess, env_with, run_cli
from mirror.debugif import MAX_IFNAME_LEN, sink_name
from mirror.lab.netns import Host, unique_name


@pytest.mark.unit
def test_sink_names_fit_and_do_not_collide():
    assert sink_name("mirror0") == "mirror0-sink"
    long_a, long_b = "debugiface0001", "debugiface0002"      # same first 10 characters
    assert sink_name(long_a) != sink_name(long_b)
    for name in (long_a, long_b, "x" * MAX_IFNAME_LEN, "abcdefghij"):
        assert len(sink_name(name)) <= MAX_IFNAME_LEN and sink_name(name).endswith("-sink")


@pytest.mark.kernel
def test_two_controllers_starting_together_share_one_debug_interface(tmp_path):
    """Two controllers on two interfaces, started at the same moment with the same new
    debug interface name: one creates it, the other uses it; the last one out removes it."""
    a, b = Host.create(), Host.create()
    dbg = unique_name("d")
    env = env_with(MIRROR_STATE_DIR=tmp_path / "state")
    first = MirrorProcess("--iface", a.host_if, "--debug-iface", dbg, env=env)
    second = MirrorProcess("--iface", b.host_if, "--debug-iface", dbg, env=env)
    try:
        started = []            # both launched before either is ready
        threads = [threading.Thread(target=lambda m=m: started.append(m.start()))
                   for m in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(started) == 2, first.output + second.output
        logs = first.output + second.output
        assert logs.count("created)") == 1, logs        # exactly one made it
        assert first.stop() == 0 and second.stop() == 0, logs
        out = subprocess.run(["ip", "link", "show", dbg], capture_output=True, text=True)
        assert out.returncode != 0, "the last controller out did not remove the debug iface"
    finally:
        for m in (first, second):
            m.kill()
        a.destroy()
        b.destroy()


@pytest.mark.kernel
@NEEDS_TCX
def test_status_shows_only_this_namespaces_tcx_links(tmp_path):
    """A controller in another network namespace with tcx links on its loopback (ifindex
    1, as the root namespace's): `mirror status` here does not list them."""
    host = Host.create()
    env = env_with(MIRROR_STATE_DIR=tmp_path / "other-state")
    other = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-m", "mirror",
                              "run", "--iface", "lo", "--hook", "tcx"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        line = b""
        while b"mirror: ready" not in line:
            line = other.stdout.readline()
            assert line, "the controller in the namespace did not start"
        inside = subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-m", "mirror",
                                 "status", "--json"], capture_output=True, text=True, env=env,
                                cwd=ROOT)
        here = run_cli("status", "--json", env=env_with(MIRROR_STATE_DIR=tmp_path / "state"))
    finally:
        other.terminate()
        other.wait(60)
        host.destroy()
    seen_inside = {i["iface"]: i["filters"] for i in json.loads(inside.stdout)["interfaces"]}
    assert sorted(seen_inside["lo"]) == ["tcx:egress", "tcx:ingress"]
    seen_here = {i["iface"]: i["filters"] for i in json.loads(here.stdout)["interfaces"]}
    assert "lo" not in seen_here, seen_here
