"""The shipped deployment files, run for real (marker `container`).

- container/compose.yaml with a Docker engine (Debian's docker.io and docker-compose), the
  engine private to the test (tests/dockerengine.py: in the test's network namespace, no
  firewall changes, its own directories, stopped after), the images copied from podman.
- container/k8s/sidecars.yaml with `podman kube play`, in the test's network namespace.

Each sends an error and a good request to the application and checks that the capture
sidecar recorded and indexed the error connection only, that both sidecars stop cleanly
on SIGTERM and that nothing of theirs is left in the namespace. What the files need
changed to run here, and why, is said where it is changed."""
from __future__ import annotations

import http.client
import os
import subprocess
from pathlib import Path

import pytest
import yaml

import dockerengine
from helpers import CONTAINER, dpkt_flows, podman
from mirror.lab.netns import Host
from mirror.capture.index import read_index
from mirror.flowkey import endpoint, parse_endpoint
from test_container import port_open, scrape, wait_for

pytestmark = [pytest.mark.container, pytest.mark.slow]


def get(server: str, source: str, port: int, path: str) -> tuple[tuple, int]:
    """One request on its own connection; returns (client address, port) and the status."""
    conn = http.client.HTTPConnection(server, port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return conn.sock.getsockname()[:2], resp.status
    finally:
        conn.close()


def assert_namespace_clean(host: Host) -> None:
    qdiscs = host.exec("tc", "qdisc", "show", "dev", "eth0").stdout
    assert "clsact" not in qdiscs, qdiscs
    assert "mirror0" not in host.exec("ip", "-o", "link", "show").stdout


def assert_one_error_flow(captures: Path) -> dict:
    """The index holds the error connection only, named after the application's eth0: the
    capture sidecar (uid 10001) read the controller's events file, shared with its group."""
    records = read_index(captures / "index.jsonl")
    assert len(records) == 1, records
    rec = records[0]
    assert rec["statuses"] == [500] and parse_endpoint(rec["server"])[1] == 80, rec
    assert rec["iface"] == "eth0", rec
    flows = {}
    for pcap in sorted(captures.glob("mirror-*.pcap*")):
        flows.update(dpkt_flows(pcap))
    assert len(flows) == 1 and next(iter(flows.values())).statuses == [500], flows
    return rec


# --- compose with a Docker engine ----------------------------------------------------------

@pytest.fixture
def engine_host():
    why = dockerengine.available()
    if why:
        pytest.skip(why)
    host = Host.create()
    engine = dockerengine.DockerEngine(host.ns, host.subnet)
    try:
        yield engine.start(), host
    finally:
        left = engine.stop()
        host.destroy()
        assert left == [], f"dockerd left these behind: {left}"
        assert engine.leftovers() == []


def test_compose_file_runs_on_docker_and_captures_the_error_flow(images, engine_host):
    engine, host = engine_host
    image, app_image = images
    engine.load_from_podman(image, app_image)
    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    for service in ("mirror", "app"):   # the names the compose file uses, in this engine
        engine.docker("tag", image if service == "mirror" else app_image,
                      compose["services"][service]["image"])
    # Docker 20.10 (Debian bookworm's) does not know CAP_BPF and CAP_PERFMON by name: the
    # compose file's documented switch gives CAP_SYS_ADMIN instead (docs/deployment.md).
    caps = {}
    if not engine.knows_capability("BPF", image):
        caps = {"MIRROR_BPF_CAP": "SYS_ADMIN", "MIRROR_PERFMON_CAP": "CAP_SYS_ADMIN"}
    project = f"mirrortest{os.getpid()}"
    args = ["-p", project, "-f", str(CONTAINER / "compose.yaml")]
    try:
        engine.compose(*args, "up", "-d", "--no-build", env=caps)
        logs = lambda svc: engine.compose(*args, "logs", "--no-color", svc).stdout  # noqa: E731
        wait_for(lambda: "mirroring HTTP" in logs("mirror"), "the controller to attach")
        wait_for(lambda: "tcpdump pid" in logs("capture"), "the capture sidecar to record")
        wait_for(lambda: port_open(host.ns_v4, 8080), "the published application port")

        _, status = get(host.ns_v4, host.host_v4, 8080, "/error")
        assert status == 500
        _, status = get(host.ns_v4, host.host_v4, 8080, "/ok")
        assert status == 200
        controller = scrape(host.ns_v4, 9464)       # published metrics ports
        assert controller["mirror_flows_marked_total"] == 1
        wait_for(lambda: scrape(host.ns_v4, 9465)["mirror_capture_packets_indexed_total"] > 0,
                 "the capture sidecar to read the mirrored packets")

        engine.compose(*args, "stop", "-t", "60")    # SIGTERM: detach, flush the index
        assert "eth0: detached" in logs("mirror") and "capture: stopped" in logs("capture")
        codes = engine.docker("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                              "--format", "{{.Names}} {{.Status}}").stdout
        assert all("Exited (0)" in line for line in codes.splitlines()
                   if "_mirror_" in line or "_capture_" in line), codes
        assert_one_error_flow(engine.volume_dir(f"{project}_captures"))
    finally:
        engine.compose(*args, "down", "-v", "-t", "30", check=False)


# --- the Kubernetes Deployment with podman kube play ---------------------------------------

def kube_play_copy(src: Path, dest: Path, image: str, app_image: str, tag: str) -> dict:
    """sidecars.yaml made runnable by podman 4.3 here; returns the names it uses.
    Changed: the images (local builds; the app runs the demo image instead of nginx:1.27
    from a registry), the names (unique per test run), the containers' `ports` dropped
    (podman refuses port mappings with host networking, which is how the pod joins the
    test's namespace; the probes get the numbers), and the seccomp profile given as the
    annotation podman reads (it ignores securityContext.seccompProfile), and the init
    container kept after it ran (podman's init-container type "always"): podman 4.3 removes
    a "once" init container in a race with its own exit, failing the whole play with
    "cannot remove container ... as it is running" (containers/podman#18477, fixed in
    4.6); the container runs once either way."""
    docs = list(yaml.safe_load_all(src.read_text()))
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    cm_name, dep_name = f"{cm['metadata']['name']}-{tag}", f"{dep['metadata']['name']}-{tag}"
    cm["metadata"]["name"], dep["metadata"]["name"] = cm_name, dep_name
    pod = dep["spec"]["template"]
    seccomp = pod["spec"]["containers"][1]["securityContext"]["seccompProfile"]
    assert pod["spec"]["containers"][1]["name"] == "mirror" and seccomp["type"] == "Localhost"
    pod["metadata"]["annotations"]["container.seccomp.security.alpha.kubernetes.io/mirror"] = \
        f"localhost/{seccomp['localhostProfile']}"
    for meta in (pod["metadata"], dep["metadata"]):
        meta.setdefault("annotations", {})["io.podman.annotations.init.container.type"] = \
            "always"
    for vol in pod["spec"]["volumes"]:
        if "configMap" in vol:
            vol["configMap"]["name"] = cm_name
        if vol["name"] == "captures":
            captures = vol["name"] = f"captures-{tag}"
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        c["image"] = app_image if c["name"] == "app" else image
        ports = {p["name"]: p["containerPort"] for p in c.pop("ports", [])}
        probe = c.get("livenessProbe", {}).get("httpGet")
        if probe:
            probe["port"] = ports[probe["port"]]
        for m in c.get("volumeMounts", []):
            if m["name"] == "captures":
                m["name"] = captures
    dest.write_text(yaml.safe_dump_all(docs))
    return {"pod": f"{dep_name}-pod-0", "volume": captures, "configmap": cm_name,
            "profile": seccomp["localhostProfile"]}


def test_kubernetes_deployment_runs_with_podman_kube_play(images, tmp_path):
    image, app_image = images
    host = Host.create()
    names = kube_play_copy(CONTAINER / "k8s" / "sidecars.yaml", tmp_path / "play.yaml",
                           image, app_image, f"t{os.getpid()}")
    profile = subprocess.run([str(CONTAINER / "seccomp-profile")], capture_output=True,
                             text=True, check=True).stdout
    (tmp_path / names["profile"]).write_text(profile)
    in_ns = ["nsenter", f"--net=/run/netns/{host.ns}"]
    pod = names["pod"]
    try:
        r = subprocess.run([*in_ns, "podman", "kube", "play", "--network", "host",
                            "--seccomp-profile-root", str(tmp_path), str(tmp_path / "play.yaml")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        logs = lambda c: (lambda r: r.stdout + r.stderr)(  # noqa: E731
            podman("logs", f"{pod}-{c}", check=False))
        wait_for(lambda: "mirroring HTTP" in logs("mirror"), "the controller to attach")
        wait_for(lambda: "tcpdump pid" in logs("capture"), "the capture sidecar to record")
        wait_for(lambda: port_open(host.ns_v4, 80), "the application")

        (client, cport), status = get(host.ns_v4, host.host_v4, 80, "/error")
        assert status == 500
        _, status = get(host.ns_v4, host.host_v4, 80, "/ok")
        assert status == 200
        assert scrape(host.ns_v4, 9464)["mirror_flows_marked_total"] == 1
        wait_for(lambda: scrape(host.ns_v4, 9465)["mirror_capture_packets_indexed_total"] > 0,
                 "the capture sidecar to read the mirrored packets")

        podman("pod", "stop", "--time", "60", pod, timeout=180)
        for c in ("mirror", "capture"):
            code = podman("inspect", "--format", "{{.State.ExitCode}}", f"{pod}-{c}").stdout
            assert code.strip() == "0", logs(c)
        assert "eth0: detached" in logs("mirror") and "capture: stopped" in logs("capture")
        mount = podman("volume", "inspect", "--format", "{{.Mountpoint}}", names["volume"]).stdout
        rec = assert_one_error_flow(Path(mount.strip()))
        assert rec["client"] == endpoint(client, cport)
        assert_namespace_clean(host)
    finally:
        subprocess.run([*in_ns, "podman", "kube", "down", str(tmp_path / "play.yaml")],
                       capture_output=True, timeout=180)
        for vol in (names["volume"], names["configmap"]):
            podman("volume", "rm", "--force", vol, check=False)
        host.destroy()
