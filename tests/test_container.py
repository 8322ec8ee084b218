"""The container deployment.

Marked `container` (deselect with -m 'not container'): builds the image with
container/build (podman; the base image made with debootstrap when missing), then runs
the sidecar model for real: a network namespace joined to the root namespace by a veth,
a podman pod in that namespace with the example application (nginx: 200 and 500), the
mirror controller and the capture sidecar; requests from the root namespace; the pod
stopped with SIGTERM; the pcaps read with dpkt and the index read back.

Marked `unit` (no root, no container): the Kubernetes manifests validated offline with
kubernetes-validate in strict mode, and the compose file's shape."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import CONTAINER, TEST_LABEL, dpkt_flows, podman
from mirror.flowkey import FlowKey, key_of
from mirror.lab.client import send
from mirror.lab.netns import Host
from mirror.capture.index import read_index

ROOT = Path(__file__).resolve().parent.parent
CAPTURE_UID = 10001
K8S_VERSIONS = ["1.28.0", "1.33.0"]


# --- offline checks of the manifests ---------------------------------------------------

def k8s_documents():
    for path in sorted((CONTAINER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


@pytest.mark.unit
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version):
    import kubernetes_validate
    kinds = []
    for name, doc in k8s_documents():
        kubernetes_validate.validate(doc, version, strict=True)    # raises when invalid
        kinds.append((name, doc["kind"]))
    assert ("sidecars.yaml", "Deployment") in kinds and ("daemonset.yaml", "DaemonSet") in kinds


@pytest.mark.unit
def test_strict_validation_rejects_an_unknown_field():
    """The validator really is strict: a misspelt field is an error, not ignored."""
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError
    name, doc = next(d for d in k8s_documents() if d[1]["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["containers"][1]["securityContxt"] = {}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def pod_specs():
    for name, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "DaemonSet"):
            yield name, doc["spec"]["template"]


@pytest.mark.unit
@pytest.mark.parametrize("name,template", list(pod_specs()),
                         ids=[name for name, _ in pod_specs()])
def test_kubernetes_sidecars_have_what_the_issue_asks(name, template):
    spec = template["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    mirror, capture = containers["mirror"], containers["capture"]
    assert mirror["args"] == ["controller"] and capture["args"] == ["capture"]
    msc = mirror["securityContext"]
    assert "privileged" not in msc and msc["allowPrivilegeEscalation"] is False
    assert msc["readOnlyRootFilesystem"] is True
    assert msc["capabilities"] == {"drop": ["ALL"],
                                   "add": ["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"]}
    assert msc["seccompProfile"] == {"type": "Localhost",
                                     "localhostProfile": "mirror-controller.json"}
    mounts = {m["mountPath"] for m in mirror["volumeMounts"]}
    assert {"/lib/modules", "/usr/src", "/run/tc-mirror"} <= mounts     # its state: writable
    sc = capture["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW", "NET_ADMIN"]}
    assert sc["runAsUser"] == CAPTURE_UID and sc["runAsNonRoot"] and "privileged" not in sc
    for c in (mirror, capture):
        assert c["resources"]["requests"] and c["resources"]["limits"]
        probe = c["livenessProbe"]["httpGet"]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == probe["port"])
        env = {e["name"]: e.get("value") for e in c["env"]}
        addr = env.get("MIRROR_METRICS_ADDR") or env["MIRROR_CAPTURE_METRICS_ADDR"]
        assert probe["path"] == "/metrics" and addr.endswith(f":{port}")
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == 9464
    assert spec.get("hostNetwork", False) == (name == "daemonset.yaml")
    for c in spec["containers"] + spec.get("initContainers", []):
        if c["image"].startswith("localhost/mirror"):
            assert c["image"] == f"localhost/mirror:{project_version()}", c["image"]


def project_version() -> str:
    import re
    return re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(),
                     re.MULTILINE).group(1)


@pytest.mark.unit
def test_manifests_scrape_both_metrics_ports_and_name_no_moving_tag():
    """The capture sidecar's port is scraped too (a Service per manifest, as a pod's
    annotations name one port); no image is :latest or untagged; the Pod Security level
    the pods need is named."""
    for path in sorted((CONTAINER / "k8s").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        services = [d for d in docs if d["kind"] == "Service"]
        assert [s["metadata"]["annotations"]["prometheus.io/port"] for s in services] == \
            ["9465"], path.name
        assert "pod-security.kubernetes.io/enforce=privileged" in path.read_text()
    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    images = [svc["image"] for svc in compose["services"].values()]
    images += [c["image"] for _, t in pod_specs() for c in t["spec"]["containers"]]
    for image in images:
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    assert compose["services"]["mirror"]["read_only"] is True


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.unit
@pytest.mark.parametrize("name,template", list(pod_specs()),
                         ids=[name for name, _ in pod_specs()])
def test_kubernetes_capture_reads_the_events_file_through_its_group(name, template):
    """The controller writes its events file into a volume the capture sidecar mounts
    read-only at the same path, shared with the capture's group (mode 0640): the pod makes
    the controller a member of that group (supplementalGroups), not CAP_CHOWN; the init
    container makes the directory root's, readable by that group only."""
    spec = template["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    mirror, capture = containers["mirror"], containers["capture"]
    path = env_of(mirror)["MIRROR_EVENTS_FILE"]
    assert env_of(capture)["MIRROR_CAPTURE_EVENTS_FILE"] == path
    group = capture["securityContext"]["runAsGroup"]
    assert env_of(mirror)["MIRROR_EVENTS_GROUP"] == str(group) == str(CAPTURE_UID)
    assert spec["securityContext"]["supplementalGroups"] == [group]
    assert "CHOWN" not in mirror["securityContext"]["capabilities"]["add"]
    directory = path.rsplit("/", 1)[0]
    mounted = {c: {m["mountPath"]: m for m in containers[c]["volumeMounts"]}[directory]
               for c in ("mirror", "capture")}
    assert mounted["mirror"]["name"] == mounted["capture"]["name"]
    assert not mounted["mirror"].get("readOnly") and mounted["capture"]["readOnly"] is True
    [init] = [c for c in spec["initContainers"]
              if any(m["name"] == mounted["mirror"]["name"] for m in c["volumeMounts"])]
    at = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}[mounted["mirror"]["name"]]
    assert f"chown 0:{group} {at} && chmod 0750 {at}" in " ".join(init["command"])


@pytest.mark.unit
def test_compose_capture_reads_the_events_file_through_its_group():
    services = yaml.safe_load((CONTAINER / "compose.yaml").read_text())["services"]
    mirror, capture = services["mirror"], services["capture"]
    path = mirror["environment"]["MIRROR_EVENTS_FILE"]
    assert capture["environment"]["MIRROR_CAPTURE_EVENTS_FILE"] == path
    group = capture["user"].split(":")[1]
    assert mirror["environment"]["MIRROR_EVENTS_GROUP"] == group == str(CAPTURE_UID)
    assert mirror["group_add"] == [group] and "CHOWN" not in mirror["cap_add"]
    directory = path.rsplit("/", 1)[0]
    assert f"events:{directory}" in mirror["volumes"]
    assert f"events:{directory}:ro" in capture["volumes"]
    # A new volume takes the image's directory: root's, readable by the group only.
    assert f"install -d -o 0 -g {group} -m 0750 {directory}" in \
        (CONTAINER / "Containerfile").read_text()


@pytest.mark.unit
def test_compose_sidecars_share_the_app_network():
    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"app", "mirror", "capture"}
    for side in ("mirror", "capture"):
        assert services[side]["network_mode"] == "service:app"
    mirror = services["mirror"]
    assert mirror["command"] == ["controller"] and "privileged" not in mirror
    assert mirror["cap_drop"] == ["ALL"]
    assert mirror["cap_add"] == ["NET_ADMIN", "NET_RAW", "${MIRROR_BPF_CAP:-BPF}",
                                 "${MIRROR_PERFMON_CAP:-PERFMON}"]
    assert services["capture"]["command"] == ["capture"]
    assert set(services["capture"]["cap_add"]) == {"NET_RAW", "NET_ADMIN"}
    assert "privileged" not in services["capture"]
    assert any(v.startswith("captures:") for v in services["capture"]["volumes"])
    assert "captures" in compose["volumes"]
    for side in ("mirror", "app"):
        build = services[side]["build"]
        assert (CONTAINER / build["context"] / build["dockerfile"]).is_file()


@pytest.mark.container
def test_build_takes_the_archive_from_apt_sources_only(tmp_path):
    """container/build names no package archive of its own: with apt sources that list
    nothing and no DEBIAN_MIRROR, it stops with a message instead of using a default."""
    import re
    for name in ("build", "Containerfile", "app/Containerfile", "entrypoint"):
        text = (CONTAINER / name).read_text()
        assert not re.search(r"(?i)(https?|ftp)://", text), name
    if not (shutil.which("podman") and shutil.which("debootstrap")):
        pytest.skip("container/build checks for podman and debootstrap first: run scripts/setup")
    empty = tmp_path / "sources.list.d"
    empty.mkdir()
    conf = tmp_path / "apt.conf"
    conf.write_text(f'Dir::Etc::sourcelist "{tmp_path}/none.list";\n'
                    f'Dir::Etc::sourceparts "{empty}";\n')
    env = {k: v for k, v in os.environ.items() if k not in ("DEBIAN_MIRROR", "DEBIAN_SUITE")}
    r = subprocess.run([str(CONTAINER / "build")], capture_output=True, text=True,
                       env=dict(env, APT_CONFIG=str(conf)), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no Debian archive in this machine's apt sources" in r.stderr
    assert "DEBIAN_MIRROR=URL and DEBIAN_SUITE=CODENAME" in r.stderr


# --- the real thing with podman --------------------------------------------------------

class Pod:
    """A podman pod in an existing network namespace: `pod create --network ns:PATH`.
    Podman 4.3 (Debian bookworm's) refuses a path for a pod; then the pod is made without
    an infra container and each container joins the namespace itself: the same sharing,
    the same lifecycle (pod stop/rm)."""

    def __init__(self, name: str, netns: str):
        self.name = name
        self.netns_path = f"/run/netns/{netns}"
        self.per_container_netns = False

    def create(self) -> "Pod":
        r = podman("pod", "create", "--name", self.name, "--label", f"{TEST_LABEL}={os.getpid()}",
                   "--network", f"ns:{self.netns_path}", check=False)
        if r.returncode != 0:
            assert "network mode path" in r.stderr, r.stderr
            podman("pod", "create", "--name", self.name, "--label",
                   f"{TEST_LABEL}={os.getpid()}", "--infra=false")
            self.per_container_netns = True
        return self

    def run(self, name: str, *args: str) -> str:
        net = ["--network", f"ns:{self.netns_path}"] if self.per_container_netns else []
        podman("run", "--detach", "--pod", self.name, "--name", f"{self.name}-{name}", *net,
               *args)
        return f"{self.name}-{name}"

    def logs(self, name: str) -> str:
        r = podman("logs", f"{self.name}-{name}", check=False)
        return r.stdout + r.stderr

    def exit_code(self, name: str) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}",
                          f"{self.name}-{name}").stdout.strip())

    def stop(self, timeout: int = 60) -> None:
        """SIGTERM to every container (each image's stop signal), SIGKILL after timeout."""
        podman("pod", "stop", "--time", str(timeout), self.name, timeout=timeout + 60)

    def remove(self) -> None:
        podman("pod", "rm", "--force", self.name, check=False, timeout=120)


def wait_for(predicate, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def port_open(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=1).close()
        return True
    except OSError:
        return False


def scrape(addr: str, port: int) -> dict[str, float]:
    host = f"[{addr}]" if ":" in addr else addr
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.fixture
def pod_host():
    """A network namespace with eth0, joined to the root namespace by a veth."""
    host = Host.create()
    pod = Pod(host.ns, host.ns)
    try:
        yield host, pod
    finally:
        pod.remove()
        host.destroy()


@pytest.fixture
def captures_dir(tmp_path):
    d = tmp_path / "captures"
    d.mkdir(mode=0o700)
    os.chown(d, CAPTURE_UID, CAPTURE_UID)
    return d


MIRROR_MOUNTS = ["-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro"]
CONTROLLER_CAPS = ["--cap-drop", "all", "--cap-add", "bpf,net_admin,perfmon"]


@pytest.fixture(scope="session")
def controller_seccomp(tmp_path_factory):
    """The controller's seccomp profile: podman's default with bpf(2) allowed to CAP_BPF
    (container/seccomp-profile)."""
    path = tmp_path_factory.mktemp("seccomp") / "mirror-controller.json"
    path.write_text(subprocess.run([str(CONTAINER / "seccomp-profile")], capture_output=True,
                                   text=True, check=True).stdout)
    return ["--security-opt", f"seccomp={path}"]


@pytest.mark.container
@pytest.mark.slow
def test_sidecars_in_a_pod_capture_the_error_flows_only(images, pod_host, captures_dir,
                                                       controller_seccomp):
    """The controller with exactly CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (and the seccomp
    profile that lets CAP_BPF call bpf), the capture as user 10001 with two capabilities."""
    image, app_image = images
    host, pod = pod_host
    pod.create()
    pod.run("app", app_image)
    pod.run("mirror", *CONTROLLER_CAPS, *controller_seccomp, *MIRROR_MOUNTS,
            "-e", "MIRROR_IFACE=eth0", "-e", "MIRROR_DEBUG_IFACE=mirror0",
            "-e", "MIRROR_METRICS_ADDR=0.0.0.0:9464", image, "controller")
    pod.run("capture", "--user", f"{CAPTURE_UID}:{CAPTURE_UID}", "--cap-drop", "all",
            "--cap-add", "net_raw,net_admin", "--read-only",
            "-v", f"{captures_dir}:/var/lib/mirror/captures",
            "-e", "MIRROR_CAPTURE_METRICS_ADDR=0.0.0.0:9465", image, "capture")

    wait_for(lambda: "mirroring HTTP" in pod.logs("mirror"), "the controller to attach")
    wait_for(lambda: port_open(host.ns_v4, 80), "the application")
    status_path = captures_dir / "status.json"
    wait_for(lambda: status_path.exists() and
             json.loads(status_path.read_text())["state"] == "capturing",
             "the capture sidecar to record mirror0")

    errors, oks = set(), set()
    for server, source in ((host.ns_v4, host.host_v4), (host.ns_v6, host.host_v6)):
        for paths, bucket in ((["/error"], errors), (["/ok", "/ok"], oks),
                              (["/ok", "/error", "/ok"], errors), (["/ok"], oks)):
            t5, statuses = send(server, source, paths)
            assert statuses == [500 if p == "/error" else 200 for p in paths]
            bucket.add(FlowKey.from_endpoints(*t5))

    # Both sidecars answer on their metrics ports (what the liveness probes ask).
    controller = scrape(host.ns_v4, 9464)
    assert controller["mirror_flows_marked_total"] == len(errors)
    assert controller["mirror_interfaces_attached"] == 1
    wait_for(lambda: scrape(host.ns_v4, 9465)["mirror_capture_packets_indexed_total"] > 0,
             "the capture sidecar to read the mirrored packets")
    assert scrape(host.ns_v4, 9465)["mirror_capture_up"] == 1

    pod.stop()
    logs = {name: pod.logs(name) for name in ("mirror", "capture")}
    assert pod.exit_code("mirror") == 0, logs["mirror"]
    assert pod.exit_code("capture") == 0, logs["capture"]
    assert "eth0: detached" in logs["mirror"]
    assert "capture: stopped" in logs["capture"]

    # The pcaps (read with dpkt) hold the error connections and nothing of the others.
    pcaps = sorted(captures_dir.glob("mirror-*.pcap*"))
    assert pcaps, sorted(p.name for p in captures_dir.iterdir())
    captured = {}
    for p in pcaps:
        assert p.stat().st_uid == CAPTURE_UID and stat.S_IMODE(p.stat().st_mode) == 0o600
        captured.update(dpkt_flows(p))
    assert set(captured) == errors and not set(captured) & oks
    for key, flow in captured.items():
        assert flow.statuses[0] == 500, key

    # The index: one line per error flow, written at SIGTERM at the latest.
    records = read_index(captures_dir / "index.jsonl")
    by_key = {key_of(r["client"], r["server"]): r for r in records}
    assert len(records) == len(errors) and set(by_key) == errors
    for key, r in by_key.items():
        assert r["statuses"][0] == 500 and r["server"].endswith(":80")
        assert r["packets"] == len(captured[key].packets)
        assert all((captures_dir / f).exists() for f in r["files"])
    keepalive = [r for r in records if r["statuses"] == [500, 200]]
    assert len(keepalive) == 2 and all(r["requests"] == ["GET /ok HTTP/1.1"] for r in keepalive)
    status = json.loads(status_path.read_text())
    assert status["state"] == "stopped" and status["packets_dropped_kernel"] == 0
    assert status["packets_captured"] > 0 and status["flows_indexed"] == len(errors)

    # The controller removed what it added in the pod's namespace: no qdisc but the
    # defaults, no filter, no debug interface.
    qdiscs = host.exec("tc", "qdisc", "show").stdout
    assert "clsact" not in qdiscs and "ingress" not in qdiscs and "htb" not in qdiscs, qdiscs
    assert host.exec("tc", "filter", "show", "dev", "eth0", "ingress").stdout == ""
    assert "mirror0" not in host.exec("ip", "-o", "link", "show").stdout


@pytest.mark.container
def test_controller_falls_back_to_the_image_headers(images, pod_host, controller_seccomp):
    """Without the host's /lib/modules and /usr/src the controller compiles against the
    image's generic Debian headers, attaches, and detaches cleanly on SIGTERM."""
    image, _ = images
    host, pod = pod_host
    pod.create()
    pod.run("mirror", *CONTROLLER_CAPS, *controller_seccomp, "-e", "MIRROR_IFACE=eth0",
            image, "controller")
    wait_for(lambda: "mirroring HTTP" in pod.logs("mirror"), "the controller to attach")
    assert "using the image's linux-headers-" in pod.logs("mirror")
    pod.stop()
    assert pod.exit_code("mirror") == 0, pod.logs("mirror")
    assert "clsact" not in host.exec("tc", "qdisc", "show", "dev", "eth0").stdout


@pytest.mark.container
@pytest.mark.parametrize("caps,missing", [
    ("bpf,net_admin", "CAP_PERFMON"),
    ("net_admin,perfmon", "CAP_BPF"),
    ("bpf,perfmon", "CAP_NET_ADMIN"),
])
def test_controller_names_the_missing_capability(images, pod_host, controller_seccomp,
                                                 caps, missing):
    """One of the three capabilities left out: the controller exits 2 at once with one line
    naming it and the fix, and changes nothing in the namespace."""
    image, _ = images
    host, pod = pod_host
    pod.create()
    pod.run("mirror", "--cap-drop", "all", "--cap-add", caps, *controller_seccomp,
            *MIRROR_MOUNTS, "-e", "MIRROR_IFACE=eth0", image, "controller")
    podman("wait", f"{pod.name}-mirror", timeout=120)
    assert pod.exit_code("mirror") == 2
    lines = [l for l in pod.logs("mirror").splitlines() if l.strip()]
    assert lines == [lines[0]] and lines[0].startswith(
        f"mirror: error: running as root without {missing}: "), lines
    assert "--cap-add BPF,NET_ADMIN,PERFMON" in lines[0]
    assert "clsact" not in host.exec("tc", "qdisc", "show", "dev", "eth0").stdout


@pytest.mark.container
def test_controller_says_when_seccomp_refuses_bpf(images, pod_host):
    """The three capabilities under podman's default seccomp profile (bpf only with
    CAP_SYS_ADMIN): the controller says so, instead of failing on its first map."""
    image, _ = images
    host, pod = pod_host
    pod.create()
    pod.run("mirror", *CONTROLLER_CAPS, *MIRROR_MOUNTS, "-e", "MIRROR_IFACE=eth0", image,
            "controller")
    podman("wait", f"{pod.name}-mirror", timeout=120)
    assert pod.exit_code("mirror") == 2
    lines = [l for l in pod.logs("mirror").splitlines() if l.strip()]
    assert len(lines) == 1 and "bpf(2) is refused (EPERM)" in lines[0], lines
    assert "container/seccomp-profile" in lines[0]
