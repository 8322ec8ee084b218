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
