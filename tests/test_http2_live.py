"""HTTP/2 cleartext (prior knowledge) end to end: real servers that encode :status
differently, a real `mirror run` on the host's veth, tcpdump on the debug interface and on
the monitored interface.

Servers: nginx (`listen ... http2`: raw literals, static indexes), Node's http2 module
(nghttp2: a literal the first time, a dynamic reference after) and a server built on the
`h2` package (hpack: Huffman-coded literals, dynamic references after). Client: nghttp
with prior knowledge, one connection per invocation. Each answers /status/NNN with NNN.

What must hold: a connection that got a 5xx is mirrored from the first segment that
carries it (found in the reference capture by tests/reference.py, which follows each
server's HPACK state over the captured segments as the classifier does, so that a
repeated status sent as a dynamic reference reads as the status it names) on, both
directions; a connection with 2xx only is not mirrored."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import reference as R
from helpers import assert_mirrored_from, controller_ask
from test_integration import Session
from mirror.lab.netns import stop_process

pytestmark = pytest.mark.kernel

PORT = 8080

NGINX_CONF = """\
daemon off;
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    default_type text/plain;
    server {{
        listen {port} http2;
        listen [::]:{port} http2;
{locations}    }}
}}
"""
# nginx's `return` takes a literal code: one location per status used below.
NGINX_CODES = (200, 204, 404, 500, 502, 503, 504)

NODE_SERVER = """\
const http2 = require('http2');
const server = http2.createServer();
server.on('stream', (stream, headers) => {
  const code = parseInt(headers[':path'].split('/').pop(), 10);
  // 1xx, 204 and 304 carry no body: Node refuses one (ERR_HTTP2_PAYLOAD_FORBIDDEN).
  const empty = code < 200 || code === 204 || code === 304;
  stream.respond({':status': code, 'content-type': 'text/plain'}, {endStream: empty});
  if (!empty) stream.end('status ' + code);
});
server.listen(%d, '::', () => console.log('listening'));
""" % PORT

H2_SERVER = """\
import socket, sys
import h2.config, h2.connection, h2.events

def serve(conn_sock):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    conn_sock.sendall(conn.data_to_send())
    while True:
        data = conn_sock.recv(65535)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[b':path'].decode()
                code = path.split('?')[0].rsplit('/', 1)[1]
                body = ('status ' + code).encode()
                conn.send_headers(event.stream_id, [(':status', code),
                                  ('content-length', str(len(body)))])
                conn.send_data(event.stream_id, body, end_stream=True)
        conn_sock.sendall(conn.data_to_send())

srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(('::', %d))
srv.listen(16)
print('listening', flush=True)
while True:
    s, _ = srv.accept()
    try:
        serve(s)
    except Exception as exc:
        print('error', exc, flush=True)
    finally:
        s.close()
""" % PORT


class Server:
    """One of the h2c servers, running inside the test host's namespace."""

    def __init__(self, host, kind: str):
        self.host, self.kind = host, kind
        self.dir = Path(tempfile.mkdtemp(prefix=f"mirror-h2-{kind}-"))
        self.proc = None

    def command(self) -> list[str]:
        if self.kind == "nginx":
            locations = "".join(
                f"        location = /status/{c} {{ return {c} 'status {c}'; }}\n"
                for c in NGINX_CODES)
            conf = NGINX_CONF.format(dir=self.dir, port=PORT, locations=locations)
            (self.dir / "nginx.conf").write_text(conf)
            return ["nginx", "-c", str(self.dir / "nginx.conf"), "-e",
                    str(self.dir / "error.log")]
        if self.kind == "node":
            (self.dir / "server.js").write_text(NODE_SERVER)
            return ["node", str(self.dir / "server.js")]
        (self.dir / "server.py").write_text(H2_SERVER)
        return [sys.executable, str(self.dir / "server.py")]

    def start(self) -> "Server":
        self.proc = self.host.popen(*self.command(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        self.host.wait_listening(PORT, self.proc, self.kind, timeout=10)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


@pytest.fixture(params=["nginx", "node", "hyper-h2"])
def h2server(request, host):
    srv = Server(host, request.param).start()
    try:
        yield srv
    finally:
        srv.stop()


def nghttp(host, family: int, codes) -> None:
    """One h2c connection (prior knowledge) asking /status/N for each code in turn."""
    addr = host.ns_v4 if family == 4 else f"[{host.ns_v6}]"
    # A query makes every URL unique (nghttp fetches a repeated URL once).
    urls = [f"http://{addr}:{PORT}/status/{c}?n={i}" for i, c in enumerate(codes)]
    # -n: discard bodies; -a off; requests go out together on one connection, and
    # the server answers them in order of arrival.
    out = subprocess.run(["nghttp", "-n", "-v", *urls], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr + out.stdout


def status_forms(payload: bytes) -> list[str]:
    """How each HEADERS frame of a server segment sends its first field (for the
    docs/protocols.md's coverage table): static, literal-raw, literal-huffman, dynamic, other."""
    forms, pos = [], 0
    while pos + 9 <= len(payload) and R.h2_frame_plausible(payload[pos:pos + 9]):
        length, ftype, flags = int.from_bytes(payload[pos:pos + 3], "big"), *payload[pos + 3:pos + 5]
        body = payload[pos + 9:pos + 9 + length]
        if ftype == 1 and body:
            skip = (1 if flags & 0x08 else 0) + (5 if flags & 0x20 else 0)
            block = body[skip:]
            while block and block[0] & 0xE0 == 0x20:
                _, used = R._hpack_int(block, 0, 5)
                block = block[used:]
            first = block[0] if block else 0
            if first & 0x80:
                forms.append("static" if (first & 0x7F) in R.H2_STATIC_STATUS else "dynamic")
            elif first & 0xC0 == 0x40 or first & 0xE0 == 0:
                index = first & (0x3F if first & 0x40 else 0x0F)
                value = block[1] if index else block[2 + (block[1] & 0x7F)]
                forms.append("literal-huffman" if value & 0x80 else "literal-raw")
            else:
                forms.append("other")
        pos += 9 + length
    return forms


def statuses_read(packets) -> list[list]:
    """Per packet of a connection, the :status codes (and H2_UNKNOWNs) the reference
    reads, following the server's HPACK state."""
    return [statuses for statuses, _ in R.follow_server(packets)]


def first_status_segment(packets, codes) -> int:
    """Index of the first segment in which the reference reads one of `codes`."""
    for i, read in enumerate(statuses_read(packets)):
        if any(c in codes for c in read):
            return i
    raise AssertionError("no such status in the reference capture")


@pytest.mark.parametrize("family", [4, 6])
def test_h2c_error_connections_mirrored(host, h2server, tmp_path, family):
    err_codes = [200, 503, 200, 500, 503]
    ok_codes = [200, 200, 204]
    with Session(host, tmp_path, "clsact") as s:
        nghttp(host, family, err_codes)
        nghttp(host, family, ok_codes)
        counters = controller_ask(tmp_path / "state")
        mirrored, ref = s.finish()
    conns = [k for k in ref if PORT in (k.port_lo, k.port_hi)]
    assert len(conns) == 2, ref.keys()
    statuses = {k: [c for read in statuses_read(ref[k].packets) for c in read]
                for k in conns}
    err = next(k for k in conns if any(c != R.H2_UNKNOWN and c >= 500 for c in statuses[k]))
    ok = next(k for k in conns if k != err)
    forms = [f for p in ref[err].packets if p.sport == PORT for f in status_forms(p.payload)]
    print(f"\n{h2server.kind} IPv{family}: statuses the reference parser reads: "
          f"error connection {statuses[err]} sent as {forms}, ok connection {statuses[ok]}; "
          f"classifier h2_responses={counters['h2_responses']} "
          f"h2_status_unknown={counters['h2_status_unknown']}")
    # The classifier read on the real sockets what the reference reads in the capture.
    read = [c for k in conns for c in statuses[k]]
    assert counters["h2_responses"] == sum(1 for c in read if c != R.H2_UNKNOWN)
    assert counters["h2_status_unknown"] == read.count(R.H2_UNKNOWN)
    assert sorted(statuses[ok]) == [200, 200, 204]
    assert ok not in mirrored
    first = first_status_segment(ref[err].packets, range(500, 600))
    assert_mirrored_from(mirrored[err].packets, ref[err].packets, first)
    assert {p.sport for p in mirrored[err].packets} == {err.port_lo, err.port_hi}


def h2load(host, paths, requests: int, clients: int, streams: int) -> None:
    urls = [f"http://{host.ns_v4}:{PORT}{p}" for p in paths]
    out = subprocess.run(["h2load", "-n", str(requests), "-c", str(clients),
                          "-m", str(streams), *urls], capture_output=True, text=True,
                         timeout=60)
    # h2load counts a 5xx as "failed"; every request must be done, none errored.
    assert out.returncode == 0 and f"{requests} done" in out.stdout, out.stdout
    assert " 0 errored, 0 timeout" in out.stdout, out.stdout


def test_h2load_under_multiplexing(host, h2server, tmp_path):
    """h2load with 10 streams in flight per connection: segments carry several responses.
    Connections that got a 503 are mirrored from the first segment holding one; the
    200-only connections of a second run are not mirrored."""
    with Session(host, tmp_path, "clsact") as s:
        h2load(host, ["/status/200", "/status/200", "/status/503"], 300, 3, 10)
        h2load(host, ["/status/200"], 200, 2, 10)
        counters = controller_ask(tmp_path / "state")
        mirrored, ref = s.finish()
    conns = [k for k in ref if PORT in (k.port_lo, k.port_hi)]
    assert len(conns) == 5
    read = {k: [c for r in statuses_read(ref[k].packets) for c in r] for k in conns}
    errs = [k for k in conns if 503 in read[k]]
    oks = [k for k in conns if k not in errs]
    print(f"\n{h2server.kind} h2load: per connection, statuses read "
          f"{[{c: read[k].count(c) for c in set(read[k])} for k in conns]}; "
          f"classifier h2_responses={counters['h2_responses']} "
          f"h2_status_unknown={counters['h2_status_unknown']}")
    assert len(errs) == 3 and len(oks) == 2
    assert not set(oks) & set(mirrored)
    for k in errs:
        first = first_status_segment(ref[k].packets, range(500, 600))
        assert_mirrored_from(mirrored[k].packets, ref[k].packets, first)
    flat = [c for k in conns for c in read[k]]
    assert counters["h2_responses"] == sum(1 for c in flat if c != R.H2_UNKNOWN)
    assert counters["h2_status_unknown"] == flat.count(R.H2_UNKNOWN)


@pytest.mark.parametrize("h2server", ["node"], indirect=True)
def test_h2_metrics(host, h2server, tmp_path):
    """The Prometheus endpoint reports h2 responses by class under proto="h2", h1 ones
    under proto="h1", and the statuses that could not be read."""
    from test_metrics import free_port, scrape
    port = free_port()
    with Session(host, tmp_path, "clsact", extra=("--metrics-addr", f"127.0.0.1:{port}")) as s:
        nghttp(host, 4, [200, 503, 404, 503, 500])
        metrics = scrape(port)
        s.finish()

    def resp(cls, proto, direction="ingress"):
        labels = (("class", cls), ("container", ""), ("direction", direction),
                  ("iface", host.host_if), ("namespace", ""), ("pod", ""),
                  ("proto", proto))
        return metrics[("mirror_http_responses_total", labels)]

    # Node: 200, 404 and 500 static, the first 503 a literal, the second a dynamic
    # reference, read through the connection's followed HPACK state.
    assert [resp(c, "h2") for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")] == \
        [0, 1, 0, 1, 3, 0]
    assert all(resp(c, "h1") == 0 for c in ("2xx", "4xx", "5xx"))
    assert all(resp(c, "h2", "egress") == 0 for c in ("2xx", "4xx", "5xx"))
    assert metrics[("mirror_h2_status_unknown_total", ())] == 0
    assert all(metrics[("mirror_hpack_not_followed_total", (("reason", r),))] == 0
               for r in ("start_unseen", "gap", "bounds", "forgotten"))
    assert metrics[("mirror_flows_marked_total", ())] == 1
