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
every configuration does the same work and what differs is the CPU time it took."""
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


def parse_h2load(text: str) -> dict:
    fin, req, st = _FINISHED.search(text), _REQUESTS.search(text), _STATUS.search(text)
    if not (fin and req and st):
        raise RuntimeError(f"unexpected h2load output:\n{text[-800:]}")
    total, started, done, succeeded, failed, errored, timeout = map(int, req.groups())
    s2, s3, s4, s5 = map(int, st.groups())
    return {"req_per_s": float(fin.group(2)), "requests": total, "done": done,
            "errored": errored, "timeout": timeout,
            "status": {"2xx": s2, "3xx": s3, "4xx": s4, "5xx": s5}}


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


def h2load(lab, error_pct: int, duration: float, proto: str = "h1",
           rate: float | None = None) -> dict:
    """One h2load run at `error_pct` error requests; the instances run concurrently.
    `rate`: requests per second offered by all clients together (None: as fast as they
    can)."""
    errors = round(error_pct / 100 * INSTANCES)
    clients = INSTANCES * CLIENTS_PER_INSTANCE
    per_client = max(1, round(rate / clients)) if rate else None
    with tempfile.TemporaryDirectory(prefix="bench-h2load-", dir="/dev/shm") as tmp:
        procs = []
        for i in range(INSTANCES):
            if proto == "h1":
                url = lab.error_url if i < errors else lab.ok_url
                args = ["--h1"]
            else:
                url = lab.error_url_h2 if i < errors else lab.ok_url_h2
                args = []
            if per_client:
                args.append(f"--rps={per_client}")
            log = Path(tmp) / f"requests-{i}.log"
            # -D in milliseconds: h2load 1.52 takes "2500ms" but not "2.5"
            cmd = taskset(CLIENT_CPU, "h2load", *args, "-c", str(CLIENTS_PER_INSTANCE),
                          "-m", "1", "-t", "1", "-D", f"{round(duration * 1000)}ms",
                          f"--log-file={log}", url)
            procs.append((log, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)))
        t0 = time.monotonic()
        outs = []
        try:
            for log, p in procs:
                text, _ = p.communicate(timeout=duration + 60)
                if p.returncode != 0:
                    raise RuntimeError(f"h2load exited {p.returncode}:\n{text[-800:]}")
                outs.append(parse_h2load(text))
        finally:
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        wall = time.monotonic() - t0
        lat = Latencies()
        for log, _ in procs:
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
