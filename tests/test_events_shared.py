"""The events file shared with the capture sidecar's group (`mirror run --events-group`),
run as the shipped manifests run the two: the controller as root with its four
capabilities only (no CAP_CHOWN, no DAC override) and the capture's group among its
supplementary groups; the capture sidecar as uid and gid 10001 with NET_RAW and
NET_ADMIN, following the file. The sidecar names the monitored interface in its index row
only if it could read the file; a controller that may not give the file to the group is
refused at start; and without the shared mode the capture user cannot read it (the
permission is what lets it, not something else)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import (ROOT, MirrorProcess, controller_ask, drop_link, env_with, mirror_cmd,
                     run_cli, wait_closed, wait_until)
from test_capture import Capture
from mirror.capture.index import read_index
from mirror.errors import UsageError
from mirror.lab.client import send
from mirror.lab.netns import unique_name
from mirror.options import Options
from mirror.safepath import SHARED_MODE, open_append

CAPTURE_UID = CAPTURE_GID = 10001
CONTROLLER_CAPS = "-all,+bpf,+net_admin,+perfmon,+net_raw"     # the manifests' four


def as_capture_user(*cmd: str) -> list[str]:
    """The command as the manifests run the capture: uid and gid 10001, no other group,
    NET_RAW and NET_ADMIN (ambient, for tcpdump: the image gives them as its file
    capabilities)."""
    return ["setpriv", f"--reuid={CAPTURE_UID}", f"--regid={CAPTURE_GID}", "--clear-groups",
            "--inh-caps=-all,+net_raw,+net_admin", "--ambient-caps=+net_raw,+net_admin", *cmd]


def controller_wrapper(groups: str | None) -> list[str]:
    """Root with the controller's four capabilities only; `groups`: its supplementary
    groups (as supplementalGroups gives them), or none."""
    return ["setpriv", f"--groups={groups}" if groups else "--clear-groups",
            "--inh-caps=-all", f"--bounding-set={CONTROLLER_CAPS}"]


class CaptureAsUser(Capture):
    """The capture sidecar as a real process, run as the capture user."""

    def __init__(self, iface, directory, *extra):
        self.dir = Path(directory)
        self.proc = subprocess.Popen(
            as_capture_user(*mirror_cmd("capture", "--iface", iface, "--dir", str(directory),
                                        *extra)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        self.output = ""


# --- unit: the file's mode and group --------------------------------------------------------

def a_group() -> int:
    """A group this process may give its files to: the capture's as root, else its own."""
    return CAPTURE_GID if os.geteuid() == 0 else os.getegid()


@pytest.mark.unit
def test_a_shared_file_is_created_0640_and_the_groups_and_stays_so(tmp_path):
    gid = a_group()
    path = tmp_path / "events.jsonl"
    fd = open_append(str(path), group=gid)
    os.write(fd, b"{}\n")
    os.close(fd)
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (SHARED_MODE, gid)
    assert os.listdir(tmp_path) == ["events.jsonl"]            # no temporary file left
    # Rotated: PATH.1 keeps both; the new PATH is made shared again.
    os.replace(path, tmp_path / "events.jsonl.1")
    os.close(open_append(str(path), group=gid))
    for p in (path, tmp_path / "events.jsonl.1"):
        assert (stat.S_IMODE(p.stat().st_mode), p.stat().st_gid) == (SHARED_MODE, gid), p
    assert sorted(os.listdir(tmp_path)) == ["events.jsonl", "events.jsonl.1"]
    # Without a group a new file is the owner's alone, as before.
    os.close(open_append(str(tmp_path / "private.jsonl")))
    assert stat.S_IMODE((tmp_path / "private.jsonl").stat().st_mode) == 0o600


@pytest.mark.unit
def test_an_existing_private_file_is_shared_when_opened(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"{}\n")
    path.chmod(0o600)
    os.close(open_append(str(path), group=a_group()))
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (SHARED_MODE, a_group())
    assert path.read_bytes() == b"{}\n"


@pytest.mark.unit
def test_events_group_needs_an_events_file_and_a_group_that_exists(tmp_path):
    for events_file in (None, "-"):
        with pytest.raises(UsageError, match="give --events-file PATH"):
            Options(ifaces=["veth0"], events_file=events_file, events_group="0").validate()
    with pytest.raises(UsageError, match="no such group"):
        Options(ifaces=["veth0"], events_file=str(tmp_path / "e.jsonl"),
                events_group="no-such-group-here").validate()
    assert Options(ifaces=["veth0"], events_group=str(os.getegid())).events_gid == \
        os.getegid()


# --- kernel: the controller and the capture user ------------------------------------------

@pytest.fixture
def shared_dirs():
    """The events directory (root's, group 10001 may list and read it, nobody else) and the
    capture directory (the capture user's), outside the test's 0700 tmp_path, which the
    capture user could not enter."""
    events = Path(tempfile.mkdtemp(prefix="mirror-events-"))
    captures = Path(tempfile.mkdtemp(prefix="mirror-captures-"))
    os.chown(events, 0, CAPTURE_GID)
    events.chmod(0o750)
    os.chown(captures, CAPTURE_UID, CAPTURE_GID)
    captures.chmod(0o700)
    try:
        yield events, captures
    finally:
        shutil.rmtree(events, ignore_errors=True)
        shutil.rmtree(captures, ignore_errors=True)


@pytest.mark.kernel
def test_the_capture_user_reads_the_events_through_the_group(host, nginx, shared_dirs,
                                                             tmp_path):
    events_dir, cap_dir = shared_dirs
    events_file = events_dir / "events.jsonl"
    debug = unique_name("d")
    env = env_with(MIRROR_STATE_DIR=tmp_path / "state")
    args = ("--iface", host.host_if, "--debug-iface", debug, "--events-file",
            str(events_file), "--events-group", str(CAPTURE_GID))
    # Neither a member of the group nor CAP_CHOWN: refused at start, naming the fix.
    refused = subprocess.run([*controller_wrapper(None), *mirror_cmd("run", *args)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "supplementalGroups" in refused.stderr and not events_file.exists(), refused.stderr

    cap = CaptureAsUser(debug, cap_dir, "--events-file", str(events_file))
    mirror = None
    try:
        assert cap.wait_state("waiting"), cap.stop_output()
        mirror = MirrorProcess(*args, env=env,
                               wrapper=controller_wrapper(str(CAPTURE_GID))).start()
        assert cap.wait_state("capturing"), cap.stop_output()
        _, statuses = send(host.ns_v4, host.host_v4, ["/error"])
        assert statuses == [500]
        wait_closed(host.ns_v4)
        state = tmp_path / "state"
        wait_until(lambda: ((c := controller_ask(state))["events_read"] >= c["events"], c),
                   "every event read")
        wait_until(lambda: (cap.status().get("flows_indexed", 0) >= 1, cap.status()),
                   "the error connection in the index")
        st = events_file.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, CAPTURE_GID, 0o640)
        [row] = read_index(cap_dir / "index.jsonl")
        assert row["iface"] == host.host_if and row["status"] == 500, row
        assert cap.stop() == 0, cap.output
        assert "cannot read the events file" not in cap.output, cap.output
    finally:
        cap.stop()
        if mirror is not None:
            assert mirror.stop() == 0, mirror.output
        drop_link(debug)
    # The mode is what lets the capture user in: the same file, the owner's alone, is not
    # readable to it.
    read = subprocess.run(as_capture_user(*mirror_cmd("events", "--file", str(events_file))),
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert read.returncode == 0 and "500" in read.stdout, read.stderr
    events_file.chmod(0o600)
    read = subprocess.run(as_capture_user(*mirror_cmd("events", "--file", str(events_file))),
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert read.returncode != 0 and "500" not in read.stdout, read.stdout
    assert run_cli("events", "--file", str(events_file)).returncode == 0
