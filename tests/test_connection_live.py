"""The connection state with real sockets, a real nginx and a real `mirror run`, on every
hook layout and both IP versions: a client that lies (an HTTP/1.x status line, an h2c
HEADERS frame carrying :status 500) never marks, counts or reports; a keep-alive
connection opened before the mirror started is mirrored with its request from its next
error on; SYN-ACKs written onto the wire by a client, or spoofed either way, never make a
status count; on lo, each error is one event and one count."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from hpack import Encoder
from hyperframe.frame import HeadersFrame, SettingsFrame

from frames import TCP_ACK, TCP_PSH, TCP_SYN, tcp4, tcp6
from helpers import HOOKS, ROOT, MirrorProcess, controller_ask, env_with, wait_until
from mirror.lab.netns import unique_name
from mirror.lab.nginx import Nginx

pytestmark = pytest.mark.kernel

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ERR500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"


class Mirror:
    """`mirror run` on one interface with an events file; counters and events read back."""

    def __init__(self, iface: str, tmp_path, hook: str = "clsact", netns: str | None = None):
        self.state = tmp_path / "state"
        self.events_path = tmp_path / "events.jsonl"
        self.proc = MirrorProcess("--iface", iface, "--debug-iface", unique_name("d"),
                                  "--hook", hook, "--events-file", str(self.events_path),
                                  env=env_with(MIRROR_STATE_DIR=self.state), netns=netns)

    def __enter__(self) -> "Mirror":
        self.proc.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc.stop() == 0, self.proc.output

    def counters(self) -> dict:
        return controller_ask(self.state, "counters")

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]

    def wait_read(self) -> dict:
        """The counters once the controller has read every event the kernel emitted."""
        return wait_until(lambda: ((c := self.counters())["events_read"] >= c["events"], c),
                          "every event read")


def addresses(host, family):
    return ((host.ns_v4, host.host_v4) if family == 4 else (host.ns_v6, host.host_v6))


def recv_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def answered_ok(server: str, source: str) -> socket.socket:
    """A keep-alive connection to nginx whose `GET /ok` was answered 200."""
    s = socket.create_connection((server, 80), timeout=10, source_address=(source, 0))
    try:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    except BaseException:
        s.close()
        raise
    return s


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", [4, 6])
def test_a_lying_http1_client_never_marks(host, nginx, tmp_path, hook, family):
    server, source = addresses(host, family)
    with Mirror(host.host_if, tmp_path, hook) as m:
        with answered_ok(server, source) as s:
            s.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            answer = recv_all(s)            # nginx: 400 Bad Request, then it closes
        assert answer.startswith(b"HTTP/1.1 400 ")
        c = wait_until(lambda: ((c := m.counters())["status_from_client"] >= 1, c),
                       "the client's status line seen")
        c = m.wait_read()
    assert (c["status_from_client"], c["flows_marked"], c["errors"], c["events"]) == (1, 0, 0, 0)
    assert c["mirrored_packets"] == 0 and m.events() == []


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", [4, 6])
def test_a_lying_h2c_client_never_marks(host, tmp_path, hook, family):
    """An h2c client (prior knowledge) whose HEADERS frame is a response's block
    (:status 500, from the independent hpack encoder): nginx refuses it, and the mirror,
    which knows the client from its SYN and preface, never reads a client's frames as
    statuses; the block starting with :status is counted apart."""
    srv = Nginx(host, h2_port=8080).start()
    try:
        server, source = addresses(host, family)
        with Mirror(host.host_if, tmp_path, hook) as m:
            settings = SettingsFrame(0).serialize()
            headers = HeadersFrame(1)
            headers.data = Encoder().encode([(":status", "500"), ("server", "liar")])
            headers.flags.add("END_HEADERS")
            headers.flags.add("END_STREAM")
            with socket.create_connection((server, 8080), timeout=10,
                                          source_address=(source, 0)) as s:
                s.sendall(PREFACE + settings)
                s.sendall(headers.serialize())
                answer = recv_all(s)
            assert answer, "nginx answered nothing"
            c = m.wait_read()
    finally:
        srv.stop()
    # nginx's own answer (a 400 on the stream, or nothing but a GOAWAY) may count as a
    # response; nothing marks, nothing is an error; the client's :status counts apart.
    assert (c["flows_marked"], c["errors"], c["events"]) == (0, 0, 0)
    assert c["status_from_client"] == 1
    assert c["side_from_request"] == 0 and c["mirrored_packets"] == 0 and m.events() == []


def spoofed_pair(family, src, sport, dst, dport, payload) -> list[bytes]:
    """A SYN-ACK, then a status line, both from src (frames from tests/frames.py)."""
    tcp = tcp4 if family == 4 else tcp6
    return [tcp(src, sport, dst, dport, flags=TCP_SYN | TCP_ACK),
            tcp(src, sport, dst, dport, payload, flags=TCP_PSH | TCP_ACK)]


def spoofed_h2_status(family, src, sport, dst, dport) -> bytes:
    """A lone segment from src: an HTTP/2 HEADERS frame whose block is :status 500 (the
    independent hpack encoder's)."""
    headers = HeadersFrame(1)
    headers.data = Encoder().encode([(":status", "500"), ("server", "spoofed")])
    headers.flags.add("END_HEADERS")
    headers.flags.add("END_STREAM")
    tcp = tcp4 if family == 4 else tcp6
    return tcp(src, sport, dst, dport, headers.serialize(), flags=TCP_PSH | TCP_ACK)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", [4, 6])
def test_spoofed_syn_acks_never_make_a_status_count(host, nginx, tmp_path, hook, family):
    """Segments written straight onto the wire (AF_PACKET), each a SYN-ACK and then a
    "HTTP/1.1 500" from the same sender: from a real client on its own open connection,
    from the client side on a 4-tuple never seen, and from the server's side (inside the
    server's namespace) on one never seen; then a lone HTTP/2 HEADERS frame carrying
    :status 500 from each side on 4-tuples never seen. A SYN-ACK names no side: the
    first status is a client's, the other four have no known side, and nothing marks,
    counts or reports."""
    server, source = addresses(host, family)
    with Mirror(host.host_if, tmp_path, hook) as m:
        with answered_ok(server, source) as s:
            cport = s.getsockname()[1]
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind((host.host_if, 0))
                for frame in (spoofed_pair(family, source, cport, server, 80, ERR500) +
                              spoofed_pair(family, source, 41999, server, 80, ERR500) +
                              [spoofed_h2_status(family, source, 41997, server, 8080)]):
                    raw.send(frame)
            in_netns(host, "import socket, sys; sys.path.insert(0, 'tests'); "
                     "from test_connection_live import spoofed_pair, spoofed_h2_status, "
                     "ERR500; raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
                     "raw.bind(('eth0', 0)); "
                     f"[raw.send(f) for f in spoofed_pair({family}, {server!r}, 80, "
                     f"{source!r}, 41998, ERR500)]; "
                     f"raw.send(spoofed_h2_status({family}, {server!r}, 8080, {source!r}, "
                     "41996))")
            c = wait_until(lambda: ((c := m.counters())["status_from_client"] +
                                    c["status_side_unknown"] >= 5, c),
                           "the five spoofed statuses seen")
        c = m.wait_read()
    assert (c["status_from_client"], c["status_side_unknown"]) == (1, 4)
    assert c["h2_responses"] == 0
    assert (c["flows_marked"], c["errors"], c["events"], c["mirrored_packets"]) == (0, 0, 0, 0)
    assert m.events() == []


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", [4, 6])
def test_connection_open_before_the_mirror_is_mirrored_from_its_next_error(
        host, nginx, tmp_path, hook, family):
    """A keep-alive connection that exchanged a request before `mirror run` started: its
    next request tells the classifier the client, and the 500 that answers it marks the
    connection, with that request in the event."""
    server, source = addresses(host, family)
    with socket.create_connection((server, 80), timeout=10, source_address=(source, 0)) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: early\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        with Mirror(host.host_if, tmp_path, hook) as m:
            s.sendall(b"GET /error HTTP/1.1\r\nHost: late\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 500 ")
            wait_until(lambda: (len(m.events()) == 1, m.events()), "one event")
            c = m.wait_read()
            flows = controller_ask(m.state, "flows")
    (ev,) = m.events()
    assert (ev["method"], ev["target"], ev["host"], ev["status"]) == ("GET", "/error", "late",
                                                                      500)
    assert ev["client"].rsplit(":", 1)[0].strip("[]") == source
    assert c["side_from_request"] == 1 and c["flows_marked"] == 1 and c["errors"] == 1
    assert [f["client"] for f in flows] == [ev["client"]]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", [4, 6])
def test_loopback_counts_each_error_once(tmp_path, hook, family):
    """nginx and its client in one network namespace, over lo, with `mirror run --iface
    lo` there: three errors are three events and three counts, though every packet passes
    lo twice (egress, then ingress)."""
    from mirror.lab.netns import Host
    loopback = "127.0.0.1" if family == 4 else "::1"
    host = Host.create()
    srv = None
    try:
        srv = Nginx(host).start()
        with Mirror("lo", tmp_path, hook, netns=host.ns) as m:
            out = in_netns(host, "import json; from mirror.lab.client import send; "
                           f"print(json.dumps(send({loopback!r}, {loopback!r}, "
                           "['/error', '/ok', '/error', '/error'])))")
            _, statuses = json.loads(out)
            assert statuses == [500, 200, 500, 500]
            wait_until(lambda: (len(m.events()) >= 3, m.events()), "three events")
            c = wait_until(lambda: ((c := controller_ask_in(host, m.state))["events_read"]
                                    >= c["events"], c), "every event read")
        assert len(m.events()) == 3
        assert (c["errors"], c["events"], c["responses"]) == (3, 3, 4)
        assert c["lo_second_pass"] > 0 and c["status_from_client"] == 0
    finally:
        if srv:
            srv.stop()
        host.destroy()


def in_netns(host, code: str) -> str:
    """What a Python snippet prints, run from the checkout in the host's namespace."""
    out = subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-c", code],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def controller_ask_in(host, state) -> dict:
    """controller_ask from inside the host's network namespace (the controller of lo is
    that namespace's)."""
    return json.loads(in_netns(host, "import json, sys; sys.path.insert(0, 'tests'); "
                               "from helpers import controller_ask; "
                               f"print(json.dumps(controller_ask({str(state)!r})))"))
