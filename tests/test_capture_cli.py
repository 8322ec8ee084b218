"""`mirror capture` refusing what it must: options of another mode, values out of bounds
(as flags and as environment variables), a directory that is not there or not the
sidecar's, a corrupt index, an interface that is not a mirror debug interface; each one
line on stderr, exit 2, nothing created. And `--list` escaping what packets put in it."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import env_with, mirror_cmd, run_cli, wait_until
from mirror.lab.netns import sh, unique_name


def refused(r, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def absent_iface() -> str:
    return unique_name("x")


# (arguments after `capture`, with DIR and OUT standing for paths that must stay absent;
# words the error line says)
ROWS = [
    (["--json", "--dir", "DIR"], ["--json", "sidecar"]),
    (["--list", "--file-size", "3", "--dir", "DIR"], ["--file-size", "--list"]),
    (["--list", "--metrics-addr", "127.0.0.1:1", "--dir", "DIR"], ["--metrics-addr"]),
    (["--list", "--dir", "DIR"], ["no capture directory"]),
    (["--metrics-addr", "bogus", "--dir", "DIR"], ["--metrics-addr"]),
    (["--file-size", "99999999999", "--dir", "DIR"], ["--file-size", "at most 1000"]),
    (["--files", "99999999", "--dir", "DIR"], ["--files", "at most"]),
    (["--buffer-kib", "99999999999", "--dir", "DIR"], ["--buffer-kib", "at most"]),
    (["-w", "OUT", "--dir", "DIR"], ["--dir", "-w"]),
    (["-w", "OUT", "--hold", "100"], ["--hold", "at most"]),
    (["-w", "OUT"], ["no debug interface"]),
    (["--extract", "--dir", "DIR"], ["-w FILE"]),
    (["--extract", "--dir", "DIR", "-w", "OUT"], ["no capture directory"]),
    (["--extract", "--status", "7xx", "--dir", "DIR", "-w", "OUT"], ["--status"]),
    (["--extract", "--since", "yesterday", "--dir", "DIR", "-w", "OUT"], ["--since"]),
    (["--extract", "--community-id", "1:abc", "--dir", "DIR", "-w", "OUT"], ["--community-id"]),
    (["--extract", "--since", "200", "--until", "100", "--dir", "DIR", "-w", "OUT"],
     ["--since is after --until"]),
    (["--list", "--extract", "--dir", "DIR"], ["two modes"]),
    (["--community-id", "1:x", "--dir", "DIR"], ["--community-id", "sidecar"]),
]


@pytest.mark.unit
@pytest.mark.parametrize("args,words", ROWS, ids=[" ".join(a) for a, _ in ROWS])
def test_refused_in_one_line_and_nothing_created(tmp_path, args, words):
    d, out = tmp_path / "dir", tmp_path / "out.pcapng"
    argv = [str(d) if a == "DIR" else str(out) if a == "OUT" else a for a in args]
    r = run_cli("capture", "--iface", absent_iface(), *argv) if "--list" not in args and \
        "--extract" not in args else run_cli("capture", *argv)
    refused(r, *words)
    assert not d.exists() and not out.exists()


ENV_ROWS = [("MIRROR_CAPTURE_FILES", "abc"), ("MIRROR_CAPTURE_FILES", "2"),
            ("MIRROR_CAPTURE_FILE_SIZE", "0"), ("MIRROR_CAPTURE_FILE_SIZE", "99999999999"),
            ("MIRROR_CAPTURE_FLOW_IDLE", "nan"), ("MIRROR_CAPTURE_BUFFER_KIB", "-5")]


@pytest.mark.unit
@pytest.mark.parametrize("name,value", ENV_ROWS)
def test_environment_errors_name_the_variable(tmp_path, name, value):
    r = run_cli("capture", "--iface", absent_iface(), "--dir", str(tmp_path / "d"),
                env=env_with(**{name: value}))
    refused(r, name)
    assert not (tmp_path / "d").exists()
    # The environment configures the sidecar only: --list in the same container reads.
    (tmp_path / "l").mkdir()
    r = run_cli("capture", "--list", "--dir", str(tmp_path / "l"), env=env_with(**{name: value}))
    assert r.returncode == 0 and "no flows indexed" in r.stdout


RECORD = {"client": "198.18.7.1:40000", "server": "198.18.7.2:80",
          "time": "2025-01-01T00:00:00.000000Z", "time_unix": 1.0,
          "packets": 3, "bytes": 300, "statuses": [500], "method": "GET",
          "target": "/x", "host": "h", "requests": [], "files": []}


@pytest.mark.unit
@pytest.mark.parametrize("content", [
    b"not json\n" + json.dumps(RECORD).encode() + b"\n",
    b"[1, 2]\n",
    json.dumps({**RECORD, "packets": "3"}).encode() + b"\n",
    json.dumps({**RECORD, "requests": [1]}).encode() + b"\n",
    b"\n",
], ids=["text", "array", "wrong-type", "wrong-item", "empty-line"])
def test_corrupt_index_is_refused(tmp_path, content):
    (tmp_path / "index.jsonl").write_bytes(content)
    for extra in ([], ["--json"]):
        refused(run_cli("capture", "--list", "--dir", str(tmp_path), *extra), "corrupt index")


@pytest.mark.unit
def test_torn_last_line_and_rotated_index_are_read(tmp_path):
    line = json.dumps(RECORD)
    (tmp_path / "index.jsonl.1").write_text(line.replace("/x", "/older") + "\n")
    (tmp_path / "index.jsonl").write_text(line + "\n" + line[:30])
    r = run_cli("capture", "--list", "--dir", str(tmp_path), "--json")
    assert r.returncode == 0 and [json.loads(x)["target"] for x in r.stdout.splitlines()] \
        == ["/older", "/x"]


@pytest.mark.unit
def test_list_escapes_what_packets_put_there(tmp_path):
    spoof = {**RECORD, "target": "/a\x1b]0;owned\x07\rGET /fake", "host": "h\x1b[2J\u202e",
             "requests": ["GET /b\x9b31m HTTP/1.1"], "method": "GET\x08"}
    (tmp_path / "index.jsonl").write_text(json.dumps(spoof) + "\n")
    (tmp_path / "status.json").write_text(json.dumps({"iface": "m\x1bx", "state": "stopped"}))
    r = run_cli("capture", "--list", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert not any(c in r.stdout for c in "\x1b\x07\r\x9b\x08\u202e"), repr(r.stdout)
    assert "\\x1b" in r.stdout and "\\u202e" in r.stdout and "\\x9b" in r.stdout
    listed = run_cli("capture", "--list", "--json", "--dir", str(tmp_path))
    assert "\x1b" not in listed.stdout and json.loads(listed.stdout)["target"] == spoof["target"]


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make directories of another user")
def test_refuses_a_directory_of_another_user_or_writable_by_others(tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    refused(run_cli("capture", "--iface", absent_iface(), "--dir", str(other)),
            "belongs to uid 65534")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused(run_cli("capture", "--iface", absent_iface(), "--dir", str(shared)),
            "writable by others", "0777")
    link = tmp_path / "link"
    os.symlink(tmp_path, link)
    os.lchown(link, 65534, 65534)
    refused(run_cli("capture", "--iface", absent_iface(), "--dir", str(link)),
            "symbolic link of uid 65534")
    assert sorted(p.name for p in other.iterdir()) == [] == sorted(shared.iterdir())


@pytest.mark.unit
def test_refuses_an_interface_that_is_not_a_debug_interface(tmp_path):
    for args in (["--dir", str(tmp_path / "d")], ["-w", str(tmp_path / "out")]):
        refused(run_cli("capture", "--iface", "lo", *args), "not a mirror debug interface")
    assert not (tmp_path / "d").exists() and not (tmp_path / "out").exists()


@pytest.mark.kernel
def test_follows_only_a_debug_interface(tmp_path):
    """A veth without the mirror's sink under the watched name: the waiting sidecar stops
    with one line (tcpdump would record a real network); a dummy is recorded."""
    name, peer = unique_name("c"), unique_name("p")
    proc = subprocess.Popen(mirror_cmd("capture", "--iface", name, "--dir", str(tmp_path / "c")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: ((tmp_path / "c" / "status.json").exists(), None), "waiting")
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", name, "up")
        sh("ip", "link", "set", peer, "up")
        _, err = proc.communicate(timeout=60)
        errors = [line for line in err.splitlines() if line.startswith("mirror: error:")]
        assert proc.returncode == 2 and len(errors) == 1, err
        assert ("not a mirror debug interface (its far end does not drop what it receives"
                in errors[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sh("ip", "link", "del", name, check=False)
