"""The README's walkthrough, from an alert to the packets, run as written.

The blocks of README.md fenced as ```sh walkthrough are run in order, each by bash as a
script, against the demo's traffic (mirror.lab.demo's request mix, HTTP/1.1 and h2c,
over IPv4 and IPv6) to the demo's server (nginx in a network namespace) that is a pod
here: containerd holds a sandbox and an `app` container with the kubelet's labels
(namespace shop, pod checkout-7d9f, the names the README uses) in the server's network
namespace, so that a real `mirror run` names the pod behind the veth. A real capture
sidecar records the debug interface and joins the controller's events file. What each
block prints is checked: the pod's error event lines, the same events out of jq, two
extracts, and tshark pairing every 5xx with the URI of its request.

The only rewriting: `mirror` is this checkout's (a wrapper on PATH), the events file's
path /var/log/mirror/events.jsonl is the test's, and MIRROR_STATE_DIR and
MIRROR_CAPTURE_DIR point at the test's state and capture directories."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import containerdengine
from helpers import (MirrorProcess, ROOT, controller_ask, drop_link, env_with, run_cli,
                     wait_closed, wait_until)
from test_capture import capture_proc  # noqa: F401 (the fixture)
from test_workload import kubelet_labels, pause_image  # noqa: F401 (a fixture)
from mirror.lab.client import send, send_h2
from mirror.lab.demo import H2_MIX, H2_PORT, MIX
from mirror.lab.netns import Host, unique_name
from mirror.lab.nginx import Nginx

README_EVENTS_FILE = "/var/log/mirror/events.jsonl"
NAMESPACE, POD, CONTAINER = "shop", "checkout-7d9f", "app"


def walkthrough_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh walkthrough\n(.*?)```", text, re.S)


@pytest.mark.unit
def test_the_readme_marks_the_walkthrough():
    """Four marked blocks, in the walkthrough's order: events, jq, extract, tshark."""
    blocks = walkthrough_blocks()
    assert [b.split()[0] + " " + b.split()[1] for b in blocks] == [
        "mirror events", "jq -c", "mirror capture", "tshark -r"], blocks


@pytest.fixture
def containerd():
    why = containerdengine.available()
    if why:
        pytest.skip(why)
    engine = containerdengine.ContainerdEngine().start()
    try:
        yield engine
    finally:
        left = engine.stop()
    assert not left, f"containerd left {left}"


def pod_labels(container: str | None) -> dict[str, str]:
    labels = kubelet_labels(container)
    labels.update({"io.kubernetes.pod.namespace": NAMESPACE, "io.kubernetes.pod.name": POD})
    return labels


def demo_traffic(host: Host) -> int:
    """One round of the demo's mix over IPv4 and IPv6; returns the error connections."""
    errors = 0
    for server, source in ((host.ns_v4, host.host_v4), (host.ns_v6, host.host_v6)):
        for _, paths in MIX:
            _, statuses = send(server, source, paths)
            errors += any(s >= 500 for s in statuses)
        for _, paths in H2_MIX:
            statuses = send_h2(server, H2_PORT, paths)
            errors += any(s >= 500 for s in statuses)
    return errors


@pytest.mark.container
def test_from_the_alert_to_the_packets(containerd, pause_image, capture_proc,  # noqa: F811
                                       tmp_path):
    host = Host.create()
    nginx = mirror = cap = None
    debug = unique_name("d")
    state, cap_dir = tmp_path / "state", tmp_path / "cap"
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    events_file = logs / "events.jsonl"
    env = env_with(MIRROR_STATE_DIR=state, MIRROR_CAPTURE_DIR=cap_dir,
                   MIRROR_CONTAINERD_SOCKET=containerd.sock, MIRROR_DOCKER_SOCKET="off",
                   MIRROR_PODMAN_SOCKET="off")
    try:
        nginx = Nginx(host, h2_port=H2_PORT).start()
        containerd.import_from_podman(pause_image)
        containerd.run("sandbox-1", pause_image, labels=pod_labels(None), netns=host.ns)
        containerd.run("app-1", pause_image, labels=pod_labels(CONTAINER), netns=host.ns)
        cap = capture_proc(debug, cap_dir, "--events-file", str(events_file))
        assert cap.wait_state("waiting"), cap.stop_output()
        mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", debug,
                               "--events-file", str(events_file), env=env).start()
        assert cap.wait_state("capturing"), cap.stop_output()

        def pod_named():
            report = json.loads(run_cli("status", "--json", env=env).stdout)
            entry = next(i for i in report["interfaces"] if i["iface"] == host.host_if)
            return entry["workload"].get("k8s.pod.name") == POD, entry
        wait_until(pod_named, "the pod named behind the veth")

        errors = demo_traffic(host)
        wait_closed(host.ns_v4, host.ns_v6)
        wait_closed(host.ns_v4, host.ns_v6, port=H2_PORT)
        wait_until(lambda: ((c := controller_ask(state))["events_read"] >= c["events"], c),
                   "every event read")
        wait_until(lambda: (cap.status().get("flows_indexed", 0) >= errors, cap.status()),
                   "every error connection in the index")
        outputs = run_walkthrough(tmp_path, env, events_file)
        check_outputs(outputs, host, tmp_path)
        check_h2c(tmp_path, env)
    finally:
        if cap is not None:
            cap.stop()
        if mirror is not None:
            assert mirror.stop() == 0, mirror.output
        if nginx is not None:
            nginx.stop()
        host.destroy()
        drop_link(debug)


def check_h2c(tmp_path, env) -> None:
    """The README's h2c block, on the extract of one h2c error connection: tshark shows
    its 500 and mirror's note on the connection, and no request: the kernel kept none (HPACK), so nothing
    pairs the response with a request path."""
    events = [json.loads(line) for line in run_cli("events", "--json", "--pod", POD,
                                                   env=env).stdout.splitlines()]
    h2 = next(e for e in events if e["proto"] == "h2")
    assert h2["method"] is None and h2["target"] is None, h2
    h2_dir = tmp_path / "h2c"
    h2_dir.mkdir()
    r = run_cli("capture", "--extract", "--community-id", h2["community_id"], "-w",
                str(h2_dir / "errors.pcapng"), env=env)
    assert r.returncode == 0, r.stderr
    [block] = re.findall(r"```sh walkthrough-h2c\n(.*?)```",
                         (ROOT / "README.md").read_text(), re.S)
    r = subprocess.run(["bash", "-e", "-c", block], capture_output=True, text=True,
                       timeout=120, cwd=h2_dir)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == ["500"], rows
    assert f"community_id {h2['community_id']}" in rows[0][1], rows
    paths = subprocess.run(["tshark", "-r", str(h2_dir / "errors.pcapng"), "-d",
                            "tcp.port==8080,http2", "-Y", "http2.headers.path", "-T",
                            "fields", "-e", "http2.headers.path"],
                           capture_output=True, text=True, timeout=120)
    assert paths.returncode == 0 and paths.stdout.strip() == "", paths.stdout


def run_walkthrough(tmp_path, env, events_file) -> list[str]:
    """Each marked block, run by bash in the test's directory; their standard outputs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "mirror"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mirror "$@"\n')
    wrapper.chmod(0o755)
    run_env = {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "PYTHONPATH": str(ROOT)}
    outputs = []
    for block in walkthrough_blocks():
        script = block.replace(README_EVENTS_FILE, str(events_file))
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env=run_env)
        assert r.returncode == 0, (script, r.stdout, r.stderr)
        outputs.append(r.stdout)
    return outputs


def check_outputs(outputs: list[str], host: Host, tmp_path) -> None:
    events, from_jq, extract, from_tshark = outputs
    # mirror events: the pod's HTTP/1.x error events, one line each, over both families:
    # the demo sends /error on three connections per family (h2c's has no request).
    lines = events.splitlines()
    assert lines, events
    for line in lines:
        assert f"{host.host_if} {NAMESPACE}/{POD} ({CONTAINER})  500  " in line, line
    h1 = [line for line in lines if "GET /error" in line]
    assert len(h1) == 6 and len(lines) == 8, events
    # jq: the same events, by the names the events file uses.
    rows = [json.loads(line) for line in from_jq.splitlines()]
    assert len(rows) == len(lines) and {r["status"] for r in rows} == {500}, from_jq
    assert sorted(r["target"] for r in rows if r["target"]) == ["/error"] * 6, from_jq
    # The extracts: every error connection of the pod, and the one the last event names.
    every = tmp_path / "errors.pcapng"
    one = tmp_path / "one.pcapng"
    assert every.stat().st_size > 0 and one.stat().st_size > 0, extract
    # tshark: every HTTP/1.x 5xx paired with the URI of its request, and mirror's note.
    rows = [line.split("\t") for line in from_tshark.splitlines()]
    errors = [r for r in rows if r[0] == "500"]
    assert len(errors) == 6, from_tshark
    for code, uri, comment in errors:
        assert uri.endswith("/error") and uri.startswith("http://"), rows
        assert ("mirror: error 500 for GET /error" in comment
                and f"on {host.host_if} ({NAMESPACE}/{POD} ({CONTAINER}))" in comment), rows
