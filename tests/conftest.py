"""Shared fixtures, and the test tiers. Every test carries exactly one tier marker
(pyproject.toml names them): `unit` runs as any user; `testrun` loads BPF programs and
runs frames through them with BPF_PROG_TEST_RUN; `kernel` builds hosts in network
namespaces and runs real servers and `mirror run`; `container` builds or runs images.
All but `unit` need root, bcc and kernel headers (scripts/setup installs them) and
remove what they build even when they fail; without root they are skipped, with the
reason."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import APP_IMAGE, CONTAINER, IMAGE, remove_stale_pods  # noqa: E402
from mirror import debugif  # noqa: E402
from mirror.lab.netns import Host, cleanup_stale, unique_name  # noqa: E402
from mirror.lab.nginx import Nginx  # noqa: E402


NEEDS_ROOT = ("needs root: loads BPF programs and builds network namespaces (scripts/test "
              "does the setup and runs the suite as root)")


def pytest_sessionstart(session):
    if os.geteuid() == 0:
        cleanup_stale()


TIERS = ("unit", "testrun", "kernel", "container")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Refuses a test without a tier marker or with more than one, so that `-m TIER`
    selects every test exactly once (checked before `-m` deselects anything: a test
    without a tier would otherwise just never run). Without root, skips all but `unit`."""
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: "
                         + (f"{len(tiers)} tier markers ({', '.join(tiers)})" if tiers
                            else "no tier marker"))
    if wrong:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker of {', '.join(TIERS)} "
            "(pytestmark = pytest.mark.TIER in the module, or @pytest.mark.TIER on the "
            "test; pyproject.toml says what each means):\n" + "\n".join(wrong))
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason=NEEDS_ROOT)
    for item in items:
        if "unit" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def classifier():
    """The classifier, compiled once per session (bcc takes about a second)."""
    from mirror.bpfprog import Classifier
    return Classifier(max_flows=4096)


@pytest.fixture(scope="session")
def sink():
    from mirror.bpfprog import Sink
    return Sink()


@pytest.fixture(scope="session")
def debug_iface(sink):
    """A debug veth pair (far end dropping) that test frames can be cloned to."""
    from pyroute2 import IPRoute
    name = unique_name("d")
    with IPRoute() as ipr:
        dbg = debugif.ensure(ipr, name, lambda: sink.fd)
    try:
        yield dbg
    finally:
        with IPRoute() as ipr:
            debugif.remove(ipr, name)


@pytest.fixture
def clf(classifier, debug_iface):
    """The session classifier with empty maps, trigger 5xx, mirroring to debug_iface,
    request snapshot off (tests of the snapshot turn it on), no budgets."""
    classifier.clear()
    classifier.set_trigger(frozenset(range(500, 600)))
    classifier.set_debug_ifindex(debug_iface.ifindex)
    classifier.set_request_bytes(0)
    classifier.set_budgets()            # unlimited, every CPU's rate window empty
    # An empty events ring buffer: the session's tests together make more error events
    # than it holds, and a full one counts events_lost instead of events.
    classifier.on_events(None)
    classifier.poll_events(0)
    yield classifier
    classifier.clear()


@pytest.fixture
def host():
    """A server host in a fresh network namespace, joined to the root namespace by a veth."""
    h = Host.create()
    try:
        yield h
    finally:
        h.destroy()


@pytest.fixture
def nginx(host):
    srv = Nginx(host).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A private ownership-record directory, so tests never see each other's records."""
    d = tmp_path / "state"
    monkeypatch.setenv("MIRROR_STATE_DIR", str(d))
    return d


def tc_show(ifname: str) -> str:
    out = subprocess.run(["tc", "qdisc", "show", "dev", ifname], capture_output=True, text=True)
    return out.stdout


@pytest.fixture
def pinned():
    """Runs the test on one CPU (the lowest it may use), so that every per-CPU slot the
    program touches is that CPU's: BPF_PROG_TEST_RUN runs on the calling CPU."""
    original = os.sched_getaffinity(0)
    cpu = min(original)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, original)


@pytest.fixture(scope="session")
def images():
    """The mirror's image and the demo app's, built (or found up to date) by
    container/build once per session: here, not in a test module, so that every module of
    real containers shares one build."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: run scripts/setup (it installs podman, runc "
                    "and debootstrap)")
    r = subprocess.run([str(CONTAINER / "build")], capture_output=True, text=True,
                       timeout=1800)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, f"container/build failed:\n{r.stdout}\n{r.stderr}"
    remove_stale_pods()
    return IMAGE, APP_IMAGE
