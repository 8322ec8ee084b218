"""Hostile input and hostile neighbours: every option and environment variable of the
commands (but `mirror capture`, tests/test_capture.py) with values nobody should give,
every path the tools write as root made into a trap, records in the state directory
that lie, and what the network can put into an operator's terminal.

The table below is the one test of wrong values: each row is one command line (and
environment) that must end with exit status 2, one line on standard error, nothing on
standard output, and nothing created in the state directory or the kernel."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from helpers import ROOT, MirrorProcess, env_with, links_of_this_run, run_cli, wait_until
from mirror.abi import MAX_REQUEST_BYTES
from mirror.discovery import MAX_IFACES_LIMIT
from mirror.hooks import tc
from mirror.lab.netns import unique_name

NOBODY = 65534
HUGE = "9" * 30
# What a whole number must not be: empty, negative, huge, not finite, not a number, not
# a whole number, Python's own spellings (1_000, 0x10), another type.
BAD_COUNT = ["", "-1", HUGE, "nan", "inf", "abc", "1.5", "1e3", "0x10", "1_000", "[1]",
             "true", " "]
BAD_SECONDS = ["", "-1", "0", "1e308", "nan", "inf", "-inf", "abc", "[1]", "true",
               str(30 * 86400 + 1)]
BAD_TRIGGER = ["", "6xx", "-1", "0", "99999", "nan", "abc", "5xx,,", "grpc:99", "[500]"]
BAD_HOOK = ["", "x", "0", "-1", "nan", "tc"]
BAD_IFNAME = ["", "x" * 16, "a/b", "a b"]
BAD_ADDR = ["", "bogus", "1.2.3.4", ":0", ":99999", "h:-1", ":nan", "[::1]:65536", "-1",
            "0", f":{HUGE}"]
# Paths that a root process must not write: {name} is made by hostile_paths() below.
BAD_FILE = ["", "{dir}", "/proc/version", "/dev/full", "{fifo}", "{symlink}",
            "{others_file}", "{world_writable}/events.jsonl", "{others_dir}/events.jsonl",
            "{others_symlink}/events.jsonl", "/proc/x", "/nonexistent-dir/x"]
BAD_CONFIG = ["", "/nonexistent", "{dir}", "/dev/zero", "{fifo}", "{config_nan}",
              "{config_inf}", "{config_huge_seconds}", "{config_trigger}", "{config_binary}",
              "{config_big}", "{config_key}"]
BAD_STATE_DIR = ["{file}", "/dev/full", "{world_writable}", "{group_writable}", "{sticky}",
                 "{others_dir}", "{others_dir}/state", "{others_symlink}/state",
                 "{symlink_to_others_dir}", "/proc/x"]

# `mirror run`'s options: (flag, environment variable, wrong values).
RUN_OPTIONS = [
    ("--max-ifaces", "MIRROR_MAX_IFACES", BAD_COUNT + ["0", str(MAX_IFACES_LIMIT + 1)]),
    ("--debug-iface", "MIRROR_DEBUG_IFACE", BAD_IFNAME),
    ("--trigger", "MIRROR_TRIGGER", BAD_TRIGGER),
    ("--hook", "MIRROR_HOOK", BAD_HOOK),
    ("--idle-timeout", "MIRROR_IDLE_TIMEOUT", BAD_SECONDS),
    ("--max-flows", "MIRROR_MAX_FLOWS", BAD_COUNT + ["0", "15", str((1 << 24) + 1)]),
    ("--request-bytes", "MIRROR_REQUEST_BYTES", BAD_COUNT + [str(MAX_REQUEST_BYTES + 1)]),
    ("--max-packets-per-flow", "MIRROR_MAX_PACKETS_PER_FLOW", BAD_COUNT + [str(1 << 32)]),
    ("--max-bytes-per-flow", "MIRROR_MAX_BYTES_PER_FLOW", BAD_COUNT + [str(1 << 64)]),
    ("--max-clones-per-second", "MIRROR_MAX_CLONES_PER_SECOND", BAD_COUNT + [str(1 << 32)]),
    ("--events-file", "MIRROR_EVENTS_FILE", BAD_FILE),
    ("--events-file-mb", "MIRROR_EVENTS_FILE_MB", BAD_COUNT + ["0", str((1 << 20) + 1)]),
    ("--metrics-addr", "MIRROR_METRICS_ADDR", BAD_ADDR),
    ("--config", "MIRROR_CONFIG", BAD_CONFIG),
    ("--iface", "MIRROR_IFACE", BAD_IFNAME + [",", "lo/x,lo"]),
    ("--exclude", "MIRROR_EXCLUDE", ["", "lo"]),
]
# Variables whose wrong values the argument types catch, so that the line names them
# (the others are paths and names, which the line names instead).
NAMED_BY_TYPE = {"MIRROR_MAX_IFACES", "MIRROR_DEBUG_IFACE", "MIRROR_TRIGGER", "MIRROR_HOOK",
                 "MIRROR_IDLE_TIMEOUT", "MIRROR_MAX_FLOWS", "MIRROR_REQUEST_BYTES",
                 "MIRROR_MAX_PACKETS_PER_FLOW", "MIRROR_MAX_BYTES_PER_FLOW",
                 "MIRROR_MAX_CLONES_PER_SECOND", "MIRROR_EVENTS_FILE_MB",
                 "MIRROR_METRICS_ADDR", "MIRROR_STATE_DIR"}


def table() -> list[tuple[str, list[str], dict, str]]:
    """(id, argv, environment, text the error line must hold). Every `mirror run` row
    names a valid interface (lo) and a debug interface of its own, so that the value
    under test is the only thing wrong; the rows run in a network namespace of their
    own, so that even a value wrongly accepted touches nothing here."""
    base = ["run", "--iface", "lo", "--debug-iface", "{debug}"]
    rows = []
    for flag, var, values in RUN_OPTIONS:
        for value in values:
            argv = [a for a in base]
            if flag in ("--iface", "--debug-iface"):
                i = argv.index(flag)
                del argv[i:i + 2]
            if flag == "--exclude" and value == "lo":
                rows.append((f"{flag}={value}", argv + [f"{flag}={value}"], {},
                             "excluded by --exclude"))
            else:
                rows.append((f"{flag}={value}", argv + [f"{flag}={value}"], {}, ""))
            if value.strip() == "" and var not in ("MIRROR_IFACE",):
                continue            # empty: unset (test_empty_variables_are_unset)
            env_argv = [a for a in argv]
            if var == "MIRROR_IFACE" and value.strip(" ,") == "":
                continue            # nothing named: the "no interface" row below
            if var == "MIRROR_EXCLUDE":
                rows.append((f"{var}={value}", env_argv, {var: value}, "excluded by"))
                continue
            rows.append((f"{var}={value}", env_argv, {var: value},
                         var if var in NAMED_BY_TYPE else ""))
    rows.append(("no interface", ["run", "--debug-iface", "{debug}"], {}, "no interface"))
    for value in BAD_STATE_DIR:
        rows.append((f"MIRROR_STATE_DIR={value}", base, {"MIRROR_STATE_DIR": value},
                     "MIRROR_STATE_DIR"))
        if value != "/proc/x":      # a state directory that is not there: nothing to read
            rows.append((f"status, MIRROR_STATE_DIR={value}", ["status"],
                         {"MIRROR_STATE_DIR": value}, "MIRROR_STATE_DIR"))
    for argv in (["status", "--json=1"], ["status", "extra"], ["status", "--follow"],
                 ["flows", "--json=x"], ["flows", "x"], ["events", "--follow=1"],
                 ["events", "--json=no"], ["events", "-f", "x"], ["detach"],
                 ["detach", "--iface=nosuch0"], ["detach", "--iface"],
                 ["--bogus"], ["nosuchcommand"], ["run", "--iface"], ["-v=3", "status"]):
        rows.append((" ".join(argv), argv, {}, ""))
    for flag, value in (("--status", "7xx"), ("--status", "none"), ("--status", ""),
                        ("--since", "yesterday"), ("--since", "nan"), ("--until", "-5m"),
                        ("--community-id", "1:abc"), ("--community-id", "")):
        rows.append((f"events {flag}={value}", ["events", f"{flag}={value}"], {}, flag))
    rows.append(("events --since after --until", ["events", "--since=10m", "--until=1h"],
                 {}, "--since"))
    for value in BAD_IFNAME:
        rows.append((f"detach --iface={value}", ["detach", f"--iface={value}"], {}, ""))
    for value in BAD_COUNT + ["0", "1001"]:
        rows.append((f"lab --rounds={value}", ["lab", f"--rounds={value}"], {}, ""))
    for value in BAD_TRIGGER:
        rows.append((f"lab --trigger={value}", ["lab", f"--trigger={value}"], {}, ""))
    for value in BAD_HOOK:
        rows.append((f"lab --hook={value}", ["lab", f"--hook={value}"], {}, ""))
    for value in ["", "/proc/x", "/dev/full", "{file}", "{others_dir}", "{world_writable}",
                  "{others_symlink}/out", "{dir_with_traps}"]:
        rows.append((f"lab --output={value}", ["lab", f"--output={value}"], {}, "--output"
                     if value else ""))
    rows.append(("lab, MIRROR_STATE_DIR={world_writable}", ["lab"],
                 {"MIRROR_STATE_DIR": "{world_writable}"}, "MIRROR_STATE_DIR"))
    return rows


def hostile_paths(top: Path) -> dict[str, str]:
    """Traps for a root process that writes files, under `top`: each the kind of path a
    careless user gives or another user prepares."""
    def d(name: str, mode: int = 0o755, owner: int = 0) -> Path:
        p = top / name
        p.mkdir()
        os.chmod(p, mode)
        os.chown(p, owner, owner)
        return p

    paths = {"dir": d("dir"), "world_writable": d("ww", 0o777),
             "group_writable": d("gw", 0o770), "sticky": d("sticky", 0o1777),
             "others_dir": d("theirs", 0o755, NOBODY)}
    fifo = top / "fifo"
    os.mkfifo(fifo)
    target = top / "target.jsonl"
    target.write_text("")
    (top / "link").symlink_to(target)
    others = top / "others.jsonl"
    others.write_text("")
    os.chown(others, NOBODY, NOBODY)
    (top / "theirlink").symlink_to(paths["dir"])
    os.lchown(top / "theirlink", NOBODY, NOBODY)
    (top / "to-theirs").symlink_to(paths["others_dir"])
    plain = top / "plainfile"
    plain.write_text("x\n")
    traps = d("traps")      # a lab output directory whose files are traps
    (traps / "mirror.pcap").symlink_to(target)
    os.mkfifo(traps / "events.jsonl")
    paths.update(fifo=fifo, symlink=top / "link", others_file=others,
                 others_symlink=top / "theirlink", symlink_to_others_dir=top / "to-theirs",
                 file=plain, dir_with_traps=traps)
    configs = {"config_nan": "idle_timeout = nan\n", "config_inf": "idle_timeout = inf\n",
               "config_huge_seconds": "idle_timeout = 1e308\n",
               "config_trigger": "trigger = 6xx\n", "config_key": "idle = 5\n",
               "config_big": "# padding\n" * 10000}
    for name, text in configs.items():
        (top / name).write_text(text)
        paths[name] = top / name
    (top / "config_binary").write_bytes(bytes(range(256)) * 4)
    paths["config_binary"] = top / "config_binary"
    return {k: str(v) for k, v in paths.items()}


def tree(top: Path) -> list[tuple]:
    """Every entry under `top` with its type, owner and mode: what a row must not change."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.join(dirpath, name), st.st_mode, st.st_uid, st.st_size))
    return sorted(out)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}


@pytest.mark.kernel
def test_wrong_values_exit_2_with_one_line_and_touch_nothing(tmp_path):
    traps = tmp_path / "traps"
    traps.mkdir()
    paths = hostile_paths(traps)
    before = tree(traps), links_of_this_run()
    rows = table()
    jobs = []
    for number, (name, argv, env, expect) in enumerate(rows):
        fill = dict(paths, debug=unique_name("d"))
        environment = dict(clean_env(), MIRROR_STATE_DIR=str(tmp_path / f"state-{number}"))
        environment.update({k: v.format(**fill) for k, v in env.items()})
        jobs.append({"argv": [a.format(**fill) for a in argv], "env": environment,
                     "timeout": 20})
    # Two drivers (tests/cli_rows.py), each in a network namespace of its own: a value
    # wrongly accepted would attach to that namespace's lo, not to anything here.
    halves = [jobs[0::2], jobs[1::2]]
    drivers = [subprocess.Popen(["unshare", "--net", sys.executable, "tests/cli_rows.py"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=ROOT) for _ in halves]
    outputs = [d.communicate(json.dumps(h), timeout=600)[0] for d, h in zip(drivers, halves)]
    results = [None] * len(jobs)
    results[0::2], results[1::2] = (json.loads(o) for o in outputs)
    failed = []
    for number, ((name, argv, env, expect), out) in enumerate(zip(rows, results)):
        lines = [l for l in out["stderr"].splitlines() if l.strip()]
        problems = []
        if out["timed_out"]:
            problems.append("still running after 20 s (the value was accepted)")
        elif out["rc"] != 2:
            problems.append(f"exit status {out['rc']}")
        if len(lines) != 1 or not lines[0].startswith("mirror: error: "):
            problems.append("not one 'mirror: error:' line")
        if expect and not any(expect in l for l in lines):
            problems.append(f"no {expect!r} in the line")
        if out["stdout"]:
            problems.append(f"stdout {out['stdout'][:100]!r}")
        if (tmp_path / f"state-{number}").exists():
            problems.append("state directory created")
        if problems:
            failed.append(f"{name}: {', '.join(problems)}: {out['stderr'].strip()[:300]!r}")
    assert not failed, f"{len(failed)} of {len(rows)} rows:\n" + "\n".join(failed)
    assert tree(traps) == before[0], "a trap was changed, or a file created beside one"
    assert links_of_this_run() == before[1], "links changed"
    assert len(rows) > 400


@pytest.mark.unit
def test_empty_variables_are_unset(monkeypatch):
    """Compose files and manifests write `X=` for a variable not set: every MIRROR_*
    variable of `mirror run` that is empty gives the built-in default, as if unset."""
    from mirror.cli import build_parser
    for _, var, _ in RUN_OPTIONS:
        monkeypatch.delenv(var, raising=False)
    defaults = vars(build_parser().parse_args(["run", "--iface", "lo"]))
    for _, var, _ in RUN_OPTIONS:
        monkeypatch.setenv(var, "")
    assert vars(build_parser().parse_args(["run", "--iface", "lo"])) == defaults


@pytest.mark.unit
def test_a_wrong_variable_is_named_not_the_flag(monkeypatch, capsys):
    from mirror.cli import main
    monkeypatch.setenv("MIRROR_MAX_FLOWS", "abc")
    assert main(["run", "--iface", "lo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mirror: error: MIRROR_MAX_FLOWS='abc'") and "--max-flows" not in err
    assert len(err.splitlines()) == 1


# --- the state directory and its records ------------------------------------------------

def forge(state: Path, name: str, record) -> Path:
    """Writes a record straight into this namespace's directory of `state`."""
    from mirror import ownership
    d = state / f"netns-{ownership.netns_id()}"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / name
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


@pytest.mark.kernel
def test_records_that_lie_are_ignored(state_dir):
    """A record is believed only when it is a regular file of root's and says what its
    name says; nothing else makes a lock be probed, a socket asked or kernel state
    removed."""
    from mirror import ownership
    # ifindexes no interface has: status then finds nothing of these in the kernel
    good = forge(state_dir, "iface-if2000000007.json", {
        "ifname": "gone0", "ifindex": 2000000007, "hook": "clsact", "parents": {},
        "created": [], "pid": 1})
    forge(state_dir, "iface-if8.json", {"ifindex": 9, "hook": "clsact"})   # another ifindex
    forge(state_dir, "iface-if10.json", "[1, 2]")
    forge(state_dir, "iface-if11.json", "{not json")
    forge(state_dir, "iface-if12.json", {"ifindex": True, "hook": "clsact"})
    forge(state_dir, "iface-if16.json", {"ifindex": 16, "hook": "clsact"})  # half a record
    theirs = forge(state_dir, "iface-if13.json", {"ifname": "x", "ifindex": 13, "hook": "clsact",
                                                   "parents": {}, "created": []})
    os.chown(theirs, NOBODY, NOBODY)
    (good.parent / "iface-if14.json").symlink_to(good)
    os.mkfifo(good.parent / "iface-if15.json")
    forge(state_dir, "controller-1-deadbeef.json", {"id": "../../etc/x", "pid": 1})
    forge(state_dir, "controller-..-x.json", {"id": "..-x", "pid": 1})
    forge(state_dir, "debug-mirror0.json", {"name": "eth0", "ifindex": 1})
    forge(state_dir, "iface-ifabc.lock", "")
    assert [r["ifindex"] for r in ownership.records("iface")] == [2000000007]
    assert ownership.records("controller") == [] and ownership.records("debug") == []
    assert ownership.read("iface", "if13") is None and ownership.read("iface", "if14") is None
    status = run_cli("status", "--json", env=env_with(MIRROR_STATE_DIR=state_dir))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["controllers"] == []


@pytest.mark.kernel
def test_forged_records_never_remove_an_administrators_qdisc(host, state_dir):
    """Records that claim this tool created qdiscs it did not (an administrator's clsact
    with no filter, an htb root with a class): neither `mirror detach` nor a controller
    that adopts the record and stops removes them, and an htb record does not make
    another's root qdisc this tool's to take over."""
    from helpers import run_cli as cli
    env = env_with(MIRROR_STATE_DIR=state_dir)
    idx = int(open(f"/sys/class/net/{host.host_if}/ifindex").read())
    subprocess.run(["tc", "qdisc", "add", "dev", host.host_if, "clsact"], check=True)
    subprocess.run(["tc", "qdisc", "add", "dev", host.host_if, "root", "handle", "1:", "htb",
                    "default", "10"], check=True)
    subprocess.run(["tc", "class", "add", "dev", host.host_if, "parent", "1:", "classid",
                    "1:10", "htb", "rate", "1gbit"], check=True)

    def qdiscs():
        with IPRoute() as ipr:
            return tc.snapshot(ipr, idx)
    before = qdiscs()
    forge(state_dir, f"iface-if{idx}.json", {
        "ifname": host.host_if, "ifindex": idx, "hook": "clsact", "created": ["clsact"],
        "parents": {"ingress": tc.CLSACT_INGRESS, "egress": tc.CLSACT_EGRESS}, "pid": 1})
    out = cli("detach", "--iface", host.host_if, env=env)
    assert out.returncode == 0, out.stderr
    assert "kept clsact qdisc" in out.stdout and qdiscs() == before
    forge(state_dir, f"iface-if{idx}.json", {
        "ifname": host.host_if, "ifindex": idx, "hook": "htb", "created": ["ingress", "htb"],
        "parents": {"ingress": tc.CLSACT_INGRESS, "egress": tc.HTB_HANDLE}, "pid": 1})
    out = cli("detach", "--iface", host.host_if, env=env)
    assert out.returncode == 0 and qdiscs() == before, out.stdout + out.stderr
    forge(state_dir, f"iface-if{idx}.json", {
        "ifname": host.host_if, "ifindex": idx, "hook": "htb", "created": ["ingress", "htb"],
        "parents": {"ingress": tc.CLSACT_INGRESS, "egress": tc.HTB_HANDLE}, "pid": 1})
    refused = cli("run", "--iface", host.host_if, "--hook", "htb", "--debug-iface",
                  unique_name("d"), env=env)
    assert refused.returncode == 2 and "already has a root qdisc (htb 1:)" in refused.stderr, \
        refused.stderr
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", unique_name("d"),
                      env=env).start()
    assert m.stop() == 0, m.output
    assert qdiscs() == before


# --- the terminal ------------------------------------------------------------------------

HOSTILE_TARGET = "/a\x1b]0;owned\x07\x1b[2J\r\nHTTP/1.1 200 OK\x9b31m\u202e"


@pytest.mark.unit
def test_events_print_no_control_character_and_json_stays_json():
    from mirror.events.follow import render_event
    event = {"time": "2026-01-01T00:00:00.000000Z", "iface": "eth0\x1b[1m", "status": 500,
             "method": "GET", "target": HOSTILE_TARGET, "host": "h\rx\x07",
             "response_ns": 1000, "client": "198.18.0.1:1", "server": "198.18.0.2:80"}
    line = render_event(event)
    assert line.isprintable(), repr(line)
    assert "\\x1b]0;owned\\x07" in line and "\\x0d\\x0a" in line and "\\u202e" in line
    assert json.loads(json.dumps(event))["target"] == HOSTILE_TARGET
    assert "\n" not in json.dumps(event) and "\x1b" not in json.dumps(event)


@pytest.mark.kernel
def test_events_from_the_network_are_escaped(host, nginx, state_dir):
    """A client sends a request line and Host header full of terminal controls; nginx
    refuses it with 400, which the trigger marks: `mirror events` prints it escaped,
    `mirror events --json` as JSON that gives the bytes back."""
    env = env_with(MIRROR_STATE_DIR=state_dir)
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", unique_name("d"),
                      "--trigger", "4xx", env=env).start()
    try:
        raw = (b"GET /x\x1b]0;owned\x07\x1b[2J HTTP/1.1\r\nHost: h\x1b[31mred\r\n"
               b"Connection: close\r\n\r\n")
        with socket.create_connection((host.ns_v4, 80), timeout=10,
                                      source_address=(host.host_v4, 0)) as s:
            s.sendall(raw)
            while s.recv(65536):
                pass

        def one_event():
            out = run_cli("events", "--json", env=env)
            return bool(out.stdout.strip()), out.stdout
        lines = wait_until(one_event, "the 400's event").splitlines()
        event = json.loads(lines[0])
        assert event["status"] == 400 and "\x1b" in event["target"] + event["host"]
        plain = run_cli("events", env=env)
        assert plain.returncode == 0, plain.stderr
        assert "\x1b" not in plain.stdout and "\x07" not in plain.stdout
        assert "\\x1b" in plain.stdout
    finally:
        assert m.stop() == 0, m.output


@pytest.mark.kernel
def test_events_into_a_closed_pipe_exit_quietly(host, nginx, state_dir):
    """`mirror events --follow --json | head -1`: once head has its line and is gone, the
    next event ends the command with status 0 and nothing on standard error."""
    from mirror.lab.client import send
    env = env_with(MIRROR_STATE_DIR=state_dir)
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", unique_name("d"),
                      env=env).start()
    follow = None
    try:
        send(host.ns_v4, host.host_v4, ["/error"])
        r, w = os.pipe()
        follow = subprocess.Popen([sys.executable, "-m", "mirror", "events", "--follow",
                                   "--json"], stdout=w, stderr=subprocess.PIPE, env=env,
                                  cwd=ROOT, text=True)
        os.close(w)
        with os.fdopen(r) as reader:
            assert json.loads(reader.readline())["status"] == 500
        # The reader is gone; each new event is a write into a closed pipe.
        for _ in range(20):
            send(host.ns_v4, host.host_v4, ["/error"])
            try:
                follow.wait(1)
                break
            except subprocess.TimeoutExpired:
                continue
        assert follow.wait(10) == 0
        assert follow.stderr.read() == ""
    finally:
        if follow and follow.poll() is None:
            follow.kill()
        assert m.stop() == 0, m.output


# --- the events file -----------------------------------------------------------------------

@pytest.mark.unit
def test_events_file_that_cannot_be_written_keeps_retries_and_says(tmp_path, monkeypatch,
                                                                   caplog):
    """The events file's directory becomes writable by everyone (so the file may not be
    opened as root): the lines wait in memory, the failure is logged and counted, and a
    timer retries until the directory is safe again, without a new event; past the
    bound, lines are dropped and counted, and close() says how many were lost."""
    from mirror.events import file as events_file
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    path = logs / "events.jsonl"
    errors = []
    out = events_file.EventsFile(str(path), on_error=lambda: errors.append(1))
    os.chmod(logs, 0o777)
    out.write('{"n": 1}')
    out.write('{"n": 2}')
    assert not path.exists() and len(out.pending) == 2 and errors
    assert "cannot write the events file" in caplog.text
    os.chmod(logs, 0o700)
    wait_until(lambda: (path.exists() and len(path.read_text().splitlines()) == 2,
                        out.pending), "the retry timer to write the waiting lines")
    assert "is written again" in caplog.text
    out.close()
    assert [json.loads(l)["n"] for l in path.read_text().splitlines()] == [1, 2]
    monkeypatch.setattr(events_file, "MAX_PENDING", 3)
    os.chmod(logs, 0o777)
    out = events_file.EventsFile(str(logs / "other.jsonl"))
    for n in range(5):
        out.write(f'{{"n": {n}}}')
    assert out.lost == 2 and len(out.pending) == 3
    out.close()
    assert "3 event line(s) could not be written and are lost (and 2 dropped before" \
        in caplog.text


@pytest.mark.unit
def test_atomic_json_never_follows_what_is_planted_beside_it(tmp_path):
    """The file written beside a record before the rename is new and unpredictable: a
    symbolic link planted at the old fixed name (`NAME.tmp`) or anywhere else is neither
    followed nor overwritten."""
    from mirror import jsonfile
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "rec.json.tmp").symlink_to(victim)
    jsonfile.write(tmp_path / "rec.json", {"a": 1})
    assert victim.read_text() == "precious\n"
    assert json.loads((tmp_path / "rec.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json", "rec.json.tmp", "victim"]
    assert stat_mode(tmp_path / "rec.json") == 0o600


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


@pytest.mark.kernel
def test_control_socket_is_reachable_by_root_only(host, state_dir):
    """The control socket is a path in the state directory, not an abstract name that
    any root process of the network namespace could reach: its directory is 0700, the
    socket 0600, and a process of another user in the same network namespace cannot
    connect."""
    from mirror import ownership
    env = env_with(MIRROR_STATE_DIR=state_dir)
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", unique_name("d"),
                      env=env).start()
    try:
        rec = ownership.records("controller")[0]
        path = Path(rec["socket"])
        assert path == ownership.socket_path(rec["id"]) and path.is_socket()
        assert stat_mode(path) == 0o600 and stat_mode(path.parent) == 0o700
        with open("/proc/net/unix") as f:
            assert f"@tc-mirror-{rec['id']}" not in f.read()    # no abstract name
        probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
                 "    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)")
        for caps in ([], ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
            # From inside the directory (a path this long does not fit sun_path): without
            # capabilities the directory stops it, with CAP_DAC_READ_SEARCH the socket's
            # own mode does.
            other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                                    "--clear-groups", *caps, sys.executable, "-c", probe,
                                    path.name], capture_output=True, text=True, timeout=30,
                                   cwd=path.parent)
            assert other.returncode == 13, other.stderr     # refused at the connect
        flows = run_cli("flows", "--json", env=env)
        assert flows.returncode == 0 and json.loads(flows.stdout) == []
    finally:
        assert m.stop() == 0, m.output
    assert not path.exists()
