"""What the request snapshot costs per packet, by snapshot length: `python -m bench.snapshot_cost`.

BPF_PROG_TEST_RUN with a large `repeat` (kernel-timed mean ns per run) on one pinned CPU,
one classifier compiled per length as `mirror run --request-bytes N` compiles it (the
snapshot map's value holds N bytes), rounds interleaved (every length once per round),
median over rounds. Frames: a request start of a small API client (curl-like, ~90 bytes of HTTP) and
of a browser-like one (~600 bytes), both on a connection whose snapshot exists (a
keep-alive connection's later requests: overwritten in place), the first request of a
connection (the snapshot inserted: one run per call), a 200 response (pays the pairing
lookup with the snapshot on), and an ACK (pays nothing new). Limits: frames are linear and caches hot,
one flow in the maps; the in-traffic cost belongs to the full bench (`make bench`)."""
from __future__ import annotations

import os
import statistics
import sys

from mirror.bpfprog import Classifier
from mirror.bpfsys import test_run

from . import frames as fr

LENGTHS = (0, 128, 256, 512, 1024)
SMALL = (b"GET /api/v1/orders/42 HTTP/1.1\r\nHost: orders.svc\r\nUser-Agent: curl/7.88.1\r\n"
         b"Accept: */*\r\n\r\n")
BROWSER = (b"GET /shop/cart?item=123456&ref=home HTTP/1.1\r\nHost: shop.example.org\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
           b"Gecko) Chrome/120.0 Safari/537.36\r\nAccept: text/html,application/xhtml+xml,"
           b"application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\nAccept-Language: "
           b"en-US,en;q=0.9\r\nAccept-Encoding: gzip, deflate\r\nCookie: session=" +
           b"a" * 160 + b"; prefs=dark\r\nReferer: http://shop.example.org/\r\n"
           b"Connection: keep-alive\r\n\r\n")
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
FIRST = "first request of a connection (insert)"


def frames() -> dict[str, tuple[str, bytes]]:
    return {
        f"request start, {len(SMALL)} B of HTTP": ("ingress", fr.to_server(4, SMALL)),
        f"request start, {len(BROWSER)} B of HTTP": ("ingress", fr.to_server(4, BROWSER)),
        "200 response": ("egress", fr.to_client(4, RESPONSE)),
        "ACK": ("ingress", fr.to_server(4, b"")),
    }


def measure(rounds: int = 15, repeat: int = 200_000) -> dict[str, dict[int, float]]:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    classifiers = {n: Classifier(max_flows=4096, request_bytes=n) for n in LENGTHS}
    cases = frames()
    first_request = next(iter(cases))
    runs: dict[str, dict[int, list[int]]] = {name: {n: [] for n in LENGTHS}
                                             for name in [*cases, FIRST]}
    for _ in range(rounds):
        for n, clf in classifiers.items():
            for name, (direction, frame) in cases.items():
                clf.clear()
                if name == "200 response":      # the pairing lookup finds a request
                    test_run(clf.fd("ingress"), cases[next(iter(cases))][1])
                runs[name][n].append(test_run(clf.fd(direction), frame, repeat).duration_ns)
            # A connection's first request: the snapshot is inserted, not overwritten.
            # One run per call (`repeat` would overwrite after the first), the entry
            # deleted before each; the median of the calls.
            direction, frame = cases[first_request]
            single = []
            for _ in range(200):
                clf.clear()
                single.append(test_run(clf.fd(direction), frame, 1).duration_ns)
            runs[FIRST][n].append(statistics.median(single))
    return {name: {n: statistics.median(v) for n, v in by_len.items()}
            for name, by_len in runs.items()}


def main() -> int:
    result = measure()
    print(f"{'ns per run (median)':40} " + " ".join(f"{n:>7}" for n in LENGTHS))
    for name, by_len in result.items():
        print(f"{name:40} " + " ".join(f"{by_len[n]:>7.0f}" for n in LENGTHS))
    print("(columns: --request-bytes; 0 = snapshot off)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
