"""gRPC over h2c end to end: real gRPC servers in the test host's namespace, a grpcio
client in the root namespace (one channel, so one connection, per invocation), a real
`mirror run --trigger 5xx,grpc:13,14` on the host's veth, tcpdump on the debug interface
and on the monitored interface.

Servers: grpcio (Python, the C core's HPACK encoder: a new-name literal for every new
grpc-status value, a dynamic reference for a repeated one), @grpc/grpc-js on Node
(nghttp2: a Huffman new-name literal for the connection's first grpc-status, a dynamic
name reference for every later one) and grpc-go (Debian's golang-google-grpc-dev, built
here in GOPATH mode: Go's x/net hpack encoder, a dynamic name reference after the first).
Each serves two unary methods over raw bytes, whose request is the code to answer: Call
fails with a trailers-only response (or answers OK with headers, data and trailers), Late
sends its headers first and the code in trailers.

What must hold: a connection is mirrored from the first segment in which the reference
(tests/reference.py, following the server's HPACK state over the connection's captured
segments) reads a grpc-status in the trigger set, and a connection in which it reads none
(OK only, NOT_FOUND only) is not mirrored; per server, which connections that is (the
coverage table of docs/protocols.md): every error connection, whatever came before the error on its
channel, for all three servers."""
from __future__ import annotations

import os
import shutil
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

# grpc-go 1.33 (Debian bookworm): raw bytes through a forced codec, no protobuf.
GO_SERVER = """\
package main

import (
	"context"
	"fmt"
	"net"
	"strconv"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type raw struct{}

func (raw) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(b []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), b...)
	return nil
}
func (raw) String() string { return "raw" }

func method(late bool) func(interface{}, context.Context, func(interface{}) error,
	grpc.UnaryServerInterceptor) (interface{}, error) {
	return func(_ interface{}, ctx context.Context, dec func(interface{}) error,
		_ grpc.UnaryServerInterceptor) (interface{}, error) {
		var in []byte
		if err := dec(&in); err != nil {
			return nil, err
		}
		code, _ := strconv.Atoi(string(in))
		if late {
			grpc.SendHeader(ctx, metadata.MD{})
		}
		if code != 0 {
			return nil, status.Error(codes.Code(code), fmt.Sprintf("failed %%d", code))
		}
		out := []byte("ok")
		return &out, nil
	}
}

func main() {
	s := grpc.NewServer(grpc.CustomCodec(raw{}))
	s.RegisterService(&grpc.ServiceDesc{ServiceName: "t.S", HandlerType: (*interface{})(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Call", Handler: method(false)},
			{MethodName: "Late", Handler: method(true)}}}, struct{}{})
	lis, err := net.Listen("tcp", "[::]:%d")
	if err != nil {
		panic(err)
	}
	panic(s.Serve(lis))
}
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


# Where Debian's golang-google-grpc-dev puts grpc-go and what it needs (GOPATH mode: the
# build reads nothing from the network).
GOPATH = Path("/usr/share/gocode")


def grpc_go_missing() -> str | None:
    """Why the grpc-go server cannot be built here (scripts/setup installs what it needs),
    or None."""
    if shutil.which("go") is None:
        return "no Go toolchain (golang-go)"
    if not (GOPATH / "src" / "google.golang.org" / "grpc").is_dir():
        return "grpc-go is not installed (golang-google-grpc-dev)"
    return None


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
        elif self.kind == "grpc-go":
            (self.dir / "server.go").write_text(GO_SERVER)
            build_env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off",
                         "GOCACHE": str(GO_CACHE)}
            out = subprocess.run(["go", "build", "-o", str(self.dir / "server"),
                                  str(self.dir / "server.go")], env=build_env,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr
            cmd = [str(self.dir / "server")]
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


# Go's build cache, kept across the session's servers (the first build compiles grpc-go).
GO_CACHE = Path(tempfile.gettempdir()) / "mirror-test-gocache"


@pytest.fixture(params=["grpcio", "grpc-js", "grpc-go"])
def grpc_server(request, host):
    if request.param == "grpc-js" and grpc_js_path() is None:
        pytest.skip("@grpc/grpc-js is not installed (scripts/setup installs it)")
    if request.param == "grpc-go" and grpc_go_missing():
        pytest.skip(f"{grpc_go_missing()}: scripts/setup installs it")
    srv = Server(host, request.param).start()
    try:
        yield srv
    finally:
        srv.stop()


def client(host, family: int, calls) -> None:
    """One connection making the calls ("Call:14") in turn; each must get its code."""
    target = f"{host.ns_v4}:{PORT}" if family == 4 else f"[{host.ns_v6}]:{PORT}"
    out = subprocess.run([sys.executable, "-c", CLIENT, target, *calls],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# Connections, in order: the calls made on each (one channel each).
CONNECTIONS = {
    "ok-only": ["Call:0", "Late:0", "Call:0"],
    "error-first": ["Call:14", "Call:0", "Late:13"],
    "error-after-ok": ["Call:0", "Call:14", "Late:13", "Call:14"],
    "late-error-after-ok": ["Late:0", "Late:13"],
    "not-found-only": ["Call:5", "Late:5"],
    "error-after-10-ok": ["Call:0", "Late:0"] * 5 + ["Call:14"],
    "error-after-1000-ok": ["Call:0", "Late:0"] * 500 + ["Late:13", "Call:14"],
}
# Which connections each server's encoding lets the classifier catch (measured here).
ERRORS = set(CONNECTIONS) - {"ok-only", "not-found-only"}
CAUGHT = {"grpcio": ERRORS, "grpc-js": ERRORS, "grpc-go": ERRORS}


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_grpc_error_connections_mirrored(host, grpc_server, tmp_path, family):
    with Session(host, tmp_path, "clsact", trigger=TRIGGER) as s:
        for calls in CONNECTIONS.values():
            client(host, family, calls)
        counters = controller_ask(tmp_path / "state")
        mirrored, ref = s.finish()
    conns = [k for k in ref if PORT in (k.port_lo, k.port_hi)]
    assert len(conns) == len(CONNECTIONS), ref.keys()
    # The client's ports grow with each new connection: order the connections by the
    # time of their first packet to name them.
    conns.sort(key=lambda k: ref[k].packets[0].ts)
    named = dict(zip(CONNECTIONS, conns))
    per_packet = {n: [grpc for _, grpc in R.follow_server(ref[k].packets)]
                  for n, k in named.items()}
    read = {n: [c for p in per_packet[n] for c in p] for n in named}
    caught = {n for n, k in named.items() if k in mirrored}
    shown = {n: r if len(r) < 20 else f"{len(r)} codes, the last {r[-3:]}"
             for n, r in read.items()}
    not_followed = {r: counters[f"hpack_{r}"]
                    for r in ("start_unseen", "gap", "bounds", "forgotten")}
    print(f"\n{grpc_server.kind} IPv{family}: grpc-status read per connection {shown}; "
          f"mirrored {sorted(caught)}; classifier grpc_ok={counters['grpc_ok']} "
          f"grpc_errors={counters['grpc_errors']} "
          f"grpc_status_unknown={counters['grpc_status_unknown']}; "
          f"HPACK state not followed {not_followed}")
    assert caught == CAUGHT[grpc_server.kind]
    flat = [c for n in read for c in read[n]]
    assert counters["grpc_ok"] == flat.count(0)
    assert counters["grpc_errors"] == sum(1 for c in flat if c != R.H2_UNKNOWN and c)
    assert counters["grpc_status_unknown"] == flat.count(R.H2_UNKNOWN)
    for name, k in named.items():
        packets = ref[k].packets
        first = next((i for i, codes in enumerate(per_packet[name]) if set(codes) & ARMED),
                     None)
        if first is None:
            assert k not in mirrored, name
            continue
        # A client frame that crossed the error in flight (a WINDOW_UPDATE or PING ack
        # sent before the client received it) may be classified on another CPU before
        # the mark: allowed, never required (helpers.crossed_trigger).
        assert_mirrored_from(mirrored[k].packets, packets, first)
        assert {p.sport for p in mirrored[k].packets} == {k.port_lo, k.port_hi}
