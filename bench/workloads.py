"""The two traffic generators, run against the lab and parsed.

iperf3: one TCP stream, client in the root namespace, `-Z` (sendfile, as the thesis),
JSON output; the figure is the receiver's bits per second. With `bitrate` it offers that
fixed load (`-b`) instead of saturating the path.

h2load: INSTANCES processes of CLIENTS_PER_INSTANCE HTTP/1.1 connections each (`--h1
-m 1`), all pinned to the client CPU, each asking one URL: k of them /error (500), the
rest /ok (200), for k/INSTANCES error requests. Separate processes, as in the thesis,
because a connection that sees a 500 is mirrored whole: mixing URLs inside one connection
would mirror every connection. Processes of one CPU get equal shares of it, so the error
share of requests follows k; the bench reports the share actually measured.
Latencies come from h2load's per-request log (--log-file).

Two protocols: HTTP/1.1 (`--h1`, port 80) and h2c (h2load's default for http:// URLs: HTTP/2
with prior knowledge, nginx's port lab.H2_PORT), one request in flight per connection
either way (-m 1). With `rate` the clients together offer that many requests per second
(h2load's --rps, per client) instead of as many as they can: the cost runs use it, so that
every configuration does the same work and what differs is the CPU time it took.

The scale mode (bench/scale.py) runs h2load differently, through the same runner and
parser: one process whose threads spread over the client CPUs, all its connections asking
one URL as fast as they can; its latency is h2load's own request-time summary."""
from __future__ import annotations

import json
import math
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .lab import CLIENT_CPU, taskset

INSTANCES = 4
CLIENTS_PER_INSTANCE = 4
ERROR_LEVELS = (0, 25, 50, 75, 100)
HIST_BUCKETS = 24               # log2 microsecond buckets: [2^k, 2^(k+1)) us, k < 24


def iperf3(lab, duration: float, omit: int, bitrate: float | None = None) -> dict:
    cmd = taskset(CLIENT_CPU, "iperf3", "-c", lab.ok_v4, "-p", "5201", "-t", str(duration),
                  "-O", str(omit), "-J", "-Z")
    if bitrate:
        cmd += ["-b", str(int(bitrate))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + omit + 30)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 failed: {proc.stderr.strip() or proc.stdout[:200]}")
    if "error" in out:
        raise RuntimeError(f"iperf3 failed: {out['error']}")
    end = out["end"]
    return {
        "bits_per_second": round(end["sum_received"]["bits_per_second"]),
        "sender_bits_per_second": round(end["sum_sent"]["bits_per_second"]),
        "retransmits": end["sum_sent"].get("retransmits"),
        "bytes_received": end["sum_received"]["bytes"],
        "cpu_client_percent": round(end["cpu_utilization_percent"]["host_total"], 1),
        "cpu_server_percent": round(end["cpu_utilization_percent"]["remote_total"], 1),
    }


_FINISHED = re.compile(r"finished in ([\d.]+)(?:s|ms|us), ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_REQUEST_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
_UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def parse_h2load(text: str) -> dict:
    """One h2load process's summary: throughput, requests, status codes, and its
    request-time line."""
    fin, req, st = _FINISHED.search(text), _REQUESTS.search(text), _STATUS.search(text)
    if not (fin and req and st):
        raise RuntimeError(f"unexpected h2load output:\n{text[-800:]}")
    total, started, done, succeeded, failed, errored, timeout = map(int, req.groups())
    s2, s3, s4, s5 = map(int, st.groups())
    return {"req_per_s": float(fin.group(2)), "requests": total, "done": done,
            "errored": errored, "timeout": timeout,
            "status": {"2xx": s2, "3xx": s3, "4xx": s4, "5xx": s5},
            "request_time": request_time(text)}


def _to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise RuntimeError(f"unexpected h2load time {text!r}")
    return float(m.group(1)) * _UNIT_US[m.group(2)]


def request_time(text: str) -> dict:
    """h2load's own request-time summary line (min, max, mean, sd), in microseconds."""
    m = _REQUEST_TIME.search(text)
    if not m:
        return {}
    lo, hi, mean, sd = (_to_us(x) for x in m.groups())
    return {"min_us": lo, "max_us": hi, "mean_us": mean, "sd_us": sd}


def duration(seconds: float) -> str:
    """h2load's -D <DURATION>: an integer with a unit (h2load 1.52 takes "2500ms" but
    rejects "2.5")."""
    return f"{round(seconds * 1000)}ms"


def h2load_command(url: str, cpus: int | str, connections: int, seconds: float,
                   threads: int = 1, proto: str = "h1", rps: int | None = None,
                   log: Path | None = None) -> list[str]:
    """One h2load process pinned to `cpus`, one request in flight per connection (-m 1);
    `rps` per connection (--rps), `log` its per-request log."""
    return taskset(cpus, "h2load", *(["--h1"] if proto == "h1" else []),
                   *([f"--rps={rps}"] if rps else []), "-c", str(connections), "-m", "1",
                   "-t", str(threads), "-D", duration(seconds),
                   *([f"--log-file={log}"] if log else []), url)


def run_h2load(commands: list[list[str]], seconds: float) -> tuple[list[dict], float]:
    """Runs h2load processes side by side, each for `seconds`; returns each one's parsed
    summary and the wall time from all started to all finished. RuntimeError when one
    fails; none outlives the call."""
    procs, outs = [], []
    try:
        for cmd in commands:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        t0 = time.monotonic()
        for p in procs:
            text, _ = p.communicate(timeout=seconds + 60)
            if p.returncode != 0:
                raise RuntimeError(f"h2load exited {p.returncode}:\n{text[-800:]}")
            outs.append(parse_h2load(text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs, time.monotonic() - t0


@dataclass
class Latencies:
    """Per-request times (us) of one h2load run, all instances together."""
    values: list[int] = field(default_factory=list)

    def add_log(self, path: Path) -> None:
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                self.values.append(int(parts[2]))

    def summary(self) -> dict:
        v = sorted(self.values)
        if not v:
            return {"count": 0}

        def pct(p):
            return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]

        hist = [0] * HIST_BUCKETS
        for x in v:
            k = x.bit_length() - 1 if x > 0 else 0
            hist[min(k, HIST_BUCKETS - 1)] += 1
        return {"count": len(v), "mean_us": round(sum(v) / len(v), 2), "p50_us": pct(50),
                "p90_us": pct(90), "p99_us": pct(99), "p999_us": pct(99.9), "max_us": v[-1],
                "log2_hist": hist}


PROTOCOLS = ("h1", "h2c")


def h2load(lab, error_pct: int, seconds: float, proto: str = "h1",
           rate: float | None = None) -> dict:
    """One h2load run at `error_pct` error requests; the instances run concurrently.
    `rate`: requests per second offered by all clients together (None: as fast as they
    can)."""
    errors = round(error_pct / 100 * INSTANCES)
    clients = INSTANCES * CLIENTS_PER_INSTANCE
    per_client = max(1, round(rate / clients)) if rate else None
    with tempfile.TemporaryDirectory(prefix="bench-h2load-", dir="/dev/shm") as tmp:
        logs, commands = [], []
        for i in range(INSTANCES):
            if proto == "h1":
                url = lab.error_url if i < errors else lab.ok_url
            else:
                url = lab.error_url_h2 if i < errors else lab.ok_url_h2
            logs.append(Path(tmp) / f"requests-{i}.log")
            commands.append(h2load_command(url, CLIENT_CPU, CLIENTS_PER_INSTANCE, seconds,
                                           proto=proto, rps=per_client, log=logs[-1]))
        outs, wall = run_h2load(commands, seconds)
        lat = Latencies()
        for log in logs:
            if log.exists():
                lat.add_log(log)
    status = {k: sum(o["status"][k] for o in outs) for k in ("2xx", "3xx", "4xx", "5xx")}
    requests = sum(o["requests"] for o in outs)
    return {
        "error_pct": error_pct,
        "proto": proto,
        "offered_req_per_s": per_client * clients if per_client else None,
        "error_instances": errors,
        "req_per_s": round(sum(o["req_per_s"] for o in outs), 1),
        "requests": requests,
        "status": status,
        "error_share": round(status["5xx"] / requests, 4) if requests else None,
        "failed": sum(o["errored"] + o["timeout"] for o in outs),
        "connections": INSTANCES * CLIENTS_PER_INSTANCE,
        "error_connections": errors * CLIENTS_PER_INSTANCE,
        "per_instance_req_per_s": [o["req_per_s"] for o in outs],
        "latency": lat.summary(),
        "wall_s": round(wall, 2),
    }


def h2load_spread(url: str, cpus: list[int], connections: int, threads: int,
                  seconds: float) -> dict:
    """The scale mode's client: one h2load process, `threads` threads over `cpus`, all
    `connections` asking `url` as fast as they can. Its latency is h2load's request-time
    summary: one process has no per-instance logs to merge."""
    [out], _ = run_h2load([h2load_command(url, ",".join(map(str, cpus)), connections,
                                          seconds, threads=threads)], seconds)
    out["latency"] = out.pop("request_time")
    return out
