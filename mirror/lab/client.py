"""HTTP clients of the test hosts (the demo, the tests, the bench): requests over one
keep-alive connection from a chosen source address, so that the caller knows the
connection's 5-tuple and can find it in a capture."""
from __future__ import annotations

import http.client


def send(server: str, source: str, paths: list[str]) -> tuple[tuple[str, int, str, int], list[int]]:
    """Sends `paths` over one keep-alive connection; returns (5-tuple, status codes)."""
    conn = http.client.HTTPConnection(server, 80, timeout=10, source_address=(source, 0))
    statuses = []
    try:
        for path in paths:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        local = conn.sock.getsockname()
        return (local[0], local[1], server, 80), statuses
    finally:
        conn.close()


def send_h2(server: str, port: int, paths: list[str]) -> list[int]:
    """Sends `paths` as streams of one HTTP/2 cleartext connection (prior knowledge) with
    nghttp; returns the statuses in the order nghttp received them."""
    import re
    import subprocess
    host = f"[{server}]" if ":" in server else server
    out = subprocess.run(["nghttp", "-nv", *(f"http://{host}:{port}{p}" for p in paths)],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"nghttp failed: {out.stderr.strip() or out.stdout[-300:]}")
    return [int(code) for code in re.findall(r"recv \(stream_id=\d+\) :status: (\d+)", out.stdout)]
