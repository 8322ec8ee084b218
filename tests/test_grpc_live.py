"""gRPC over h2c end to end: real gRPC servers in the test host's namespace, a grpcio
client in the root namespace (one channel, so one connection, per invocation), a real
`mirror run --trigger 5xx,grpc:13,14` on the host's veth, tcpdump on the debug interface
and on the monitored interface.

Servers: grpcio (Python, the C core's HPACK encoder: a new-name literal for every new
grpc-status value, a dynamic reference for a repeated one) and @grpc/grpc-js on Node
(nghttp2: a Huffman new-name literal for the connection's first grpc-status, a dynamic
name reference for every later one). Each serves two unary methods over raw bytes, whose
request is the code to answer: Call fails with a trailers-only response (or answers OK
with headers, data and trailers), Late sends its headers first and the code in trailers.

What must hold: a connection is mirrored from the first segment in which the reference
parser (tests/reference.py) reads a grpc-status in the trigger set, and a connection in
which it reads none (OK only, NOT_FOUND only, or errors only as dynamic references) is
not mirrored; and, per server, which connections that is (docs/protocols.md's coverage table)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import reference as R
from helpers import controller_ask, same_packets, signature
from test_integration import Session
from mirror.lab.netns import stop_process

pytestmark = pytest.mark.kernel

PORT = 50051
TRIGGER = "5xx,grpc:13,14"
ARMED = {13, 14}

PY_SERVER = """\
import sys
from concurrent import futures
import grpc

CODES = {c.value[0]: c for c in grpc.StatusCode}

def call(request, context):
    code = int(request)
    if code:
        context.abort(CODES[code], 'failed ' + str(code))
    return b'ok'

def late(request, context):
    code = int(request)
    context.send_initial_metadata(())
    if code:
        context.set_code(CODES[code])
        context.set_details('late ' + str(code))
    return b'ok'

handler = grpc.method_handlers_generic_handler('t.S', {
    'Call': grpc.unary_unary_rpc_method_handler(call),
    'Late': grpc.unary_unary_rpc_method_handler(late)})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port('[::]:%d')
server.start()
server.wait_for_termination()
""" % PORT

NODE_SERVER = """\
const grpc = require('@grpc/grpc-js');
const id = (x) => x;
const method = (name) => ({path: '/t.S/' + name, requestStream: false, responseStream: false,
  requestSerialize: id, requestDeserialize: id, responseSerialize: id, responseDeserialize: id});
const server = new grpc.Server();
server.addService({Call: method('Call'), Late: method('Late')}, {
  Call: (call, cb) => { const c = parseInt(call.request.toString(), 10);
    if (c) cb({code: c, details: 'failed ' + c}); else cb(null, Buffer.from('ok')); },
  Late: (call, cb) => { const c = parseInt(call.request.toString(), 10);
    call.sendMetadata(new grpc.Metadata());
    if (c) cb({code: c, details: 'late ' + c}); else cb(null, Buffer.from('ok')); },
});
server.bindAsync('[::]:%d', grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) throw err; });
""" % PORT

CLIENT = """\
import sys
import grpc

channel = grpc.insecure_channel(sys.argv[1])
for spec in sys.argv[2:]:
    method, code = spec.split(':')
    call = channel.unary_unary('/t.S/' + method)
    try:
        call(code.encode(), timeout=10)
        got = 0
    except grpc.RpcError as exc:
        got = exc.code().value[0]
    if got != int(code):
        sys.exit('%s answered %d' % (spec, got))
channel.close()
"""


def grpc_js_path() -> Path | None:
    """Where @grpc/grpc-js is installed (scripts/setup: the virtualenv's node/), or None."""
    env = os.environ.get("MIRROR_TEST_NODE_PATH")
    path = Path(env) if env else Path(sys.prefix) / "node" / "node_modules"
    return path if (path / "@grpc" / "grpc-js").is_dir() else None


class Server:
    def __init__(self, host, kind: str):
        self.host, self.kind = host, kind
        self.dir = Path(tempfile.mkdtemp(prefix=f"mirror-grpc-{kind}-"))
        self.proc = None

    def start(self) -> "Server":
        env = None
        if self.kind == "grpcio":
            (self.dir / "server.py").write_text(PY_SERVER)
            cmd = [sys.executable, str(self.dir / "server.py")]
        else:
            (self.dir / "server.js").write_text(NODE_SERVER)
            cmd = ["node", str(self.dir / "server.js")]
            env = {**os.environ, "NODE_PATH": str(grpc_js_path())}
        self.proc = self.host.popen(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=env)
        self.host.wait_listening(PORT, self.proc, self.kind, timeout=20)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


@pytest.fixture(params=["grpcio", "grpc-js"])
def grpc_server(request, host):
    if request.param == "grpc-js" and grpc_js_path() is None:
        pytest.skip("@grpc/grpc-js is not installed (scripts/setup installs it)")
    srv = Server(host, request.param).start()
    try:
        yield srv
    finally:
        srv.stop()


def client(host, calls) -> None:
    """One connection making the calls ("Call:14") in turn; each must get its code."""
    out = subprocess.run([sys.executable, "-c", CLIENT, f"{host.ns_v4}:{PORT}", *calls],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def grpc_read(packet) -> list:
    """What the classifier's gRPC walk reads in a segment, per the reference."""
    payload = packet.payload
    if R.status_code(payload) is not None or R.request_start(payload):
        return []
    return R.grpc_status(payload)


# Connections, in order: the calls made on each.
CONNECTIONS = {
    "ok-only": ["Call:0", "Late:0", "Call:0"],
    "error-first": ["Call:14", "Call:0", "Late:13"],
    "error-after-ok": ["Call:0", "Call:14", "Late:13", "Call:14"],
    "late-error-after-ok": ["Late:0", "Late:13"],
    "not-found-only": ["Call:5", "Late:5"],
}
# Which connections each server's encoding lets the classifier catch (measured here).
CAUGHT = {
    "grpcio": {"error-first", "error-after-ok", "late-error-after-ok"},
    "grpc-js": {"error-first"},
}


def test_grpc_error_connections_mirrored(host, grpc_server, tmp_path):
    with Session(host, tmp_path, "clsact", trigger=TRIGGER) as s:
        for calls in CONNECTIONS.values():
            client(host, calls)
        counters = controller_ask(tmp_path / "state")
        mirrored, ref = s.finish()
    conns = [k for k in ref if PORT in (k.port_lo, k.port_hi)]
    assert len(conns) == len(CONNECTIONS), ref.keys()
    # The client's ports grow with each new connection: order the connections by the
    # time of their first packet to name them.
    conns.sort(key=lambda k: ref[k].packets[0].ts)
    named = dict(zip(CONNECTIONS, conns))
    read = {n: [c for p in ref[k].packets for c in grpc_read(p)] for n, k in named.items()}
    caught = {n for n, k in named.items() if k in mirrored}
    print(f"\n{grpc_server.kind}: grpc-status read per connection {read}; mirrored "
          f"{sorted(caught)}; classifier grpc_ok={counters['grpc_ok']} "
          f"grpc_errors={counters['grpc_errors']} "
          f"grpc_status_unknown={counters['grpc_status_unknown']}")
    assert caught == CAUGHT[grpc_server.kind]
    flat = [c for n in read for c in read[n]]
    assert counters["grpc_ok"] == flat.count(0)
    assert counters["grpc_errors"] == sum(1 for c in flat if c != R.H2_UNKNOWN and c)
    assert counters["grpc_status_unknown"] == flat.count(R.H2_UNKNOWN)
    for name, k in named.items():
        packets = ref[k].packets
        first = next((i for i, p in enumerate(packets) if set(grpc_read(p)) & ARMED), None)
        if first is None:
            assert k not in mirrored, name
            continue
        assert same_packets(mirrored[k].packets, packets[first:]), (
            f"{name}: mirrored {[signature(p) for p in mirrored[k].packets]}\n"
            f"expected {[signature(p) for p in packets[first:]]}")
        assert {p.sport for p in mirrored[k].packets} == {k.port_lo, k.port_hi}
