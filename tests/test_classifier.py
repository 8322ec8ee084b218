"""The classifier (bpf/mirror.c) driven frame by frame through BPF_PROG_TEST_RUN.

Every frame is sent through `send()`, which asserts the verdict (TC_ACT_UNSPEC: pass to
the next filter) and that the packet comes back unchanged, and returns the exact counter
deltas; tests compare those deltas with a dict of every counter that must have moved, so
a counter moving that should not fails the test too.

In a test run the whole frame is linear (no "nonlinear" path is reachable) and the skb's
ifindex is the loopback's (1): not a monitored lo (the `monitored` map does not hold 1), so
both hooks count as any interface's.

A status counts only on a connection whose client side is known, from its server side, in
the server's direction: tests open their connections first (`open_conn`: the client's SYN
and the server's SYN-ACK), with the server's packets at the hook the test sends its
responses to. tests/test_request_snapshot.py has the tests of the connection state itself:
who may mark, the side learned from a request, the hostile cases."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

CLOCK_MONOTONIC_COARSE = 6    # <linux/time.h>; bpf_ktime_get_coarse_ns() reads it

import frames as F
from frames import (IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_NONE, IPPROTO_TCP, IPPROTO_UDP,
                    TCP_ACK, TCP_FIN, TCP_SYN, cut, dest_opts, eth, fragment,
                    hop_by_hop, ipv4, ipv4_options, ipv6, routing, tcp, tcp4, tcp6,
                    tcp_options)
from mirror.abi import COUNTERS, TC_ACT_UNSPEC
from mirror.flowkey import FlowKey

LO_IFINDEX = 1          # skb->ifindex in BPF_PROG_TEST_RUN
BOGUS_IFINDEX = 999999

# Addresses: 198.18.0.0/15 and 2001:db8::/32 only.
SRV4, CLI4 = "198.18.0.80", "198.19.7.10"
SRV6, CLI6 = "2001:db8::80", "2001:db8:7::10"
SPORT, CPORT = 80, 40000

ERR500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"


# --- helpers ---------------------------------------------------------------------------

def counts(*parts: dict, **extra: int) -> dict:
    """Sums counter dicts: counts(TCP4, RESP["2xx"], mirrored_packets=1)."""
    out: dict[str, int] = {}
    for part in (*parts, extra):
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


PKT = {"packets": 1}
IP4 = counts(PKT, ipv4=1)
IP6 = counts(PKT, ipv6=1)
TCP4 = counts(IP4, tcp=1)
TCP6 = counts(IP6, tcp=1)
RESP = {cls: {"responses": 1, f"resp_{cls}": 1}
        for cls in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")}
# A 5xx that marks its connection: counted, an error, an event, no request kept (the
# fixture leaves the request snapshot off).
ERROR500 = counts(RESP["5xx"], flows_marked=1, events=1, errors=1, resp_no_request=1)


def mirrored(frame: bytes, n: int = 1) -> dict:
    return {"mirrored_packets": n, "mirrored_bytes": n * len(frame)}


def send(clf, frame: bytes, direction: str = "egress") -> dict:
    """Runs one frame, asserts the pass verdict and an untouched packet, and returns the
    counters that moved, with their deltas."""
    before = clf.counters()
    res = clf.test_run(direction, frame)
    assert res.retval == TC_ACT_UNSPEC, f"verdict {res.retval}, not TC_ACT_UNSPEC"
    assert res.data_out == frame, "the classifier changed the packet"
    after = clf.counters()
    return {k: after[k] - before[k] for k in COUNTERS if after[k] != before[k]}


def check(clf, frame: bytes, expected: dict, direction: str = "egress") -> None:
    unknown = set(expected) - set(COUNTERS)
    assert not unknown, f"not counters: {unknown}"
    assert send(clf, frame, direction) == expected


def open_conn(clf, family: int = 4, server_dir: str = "egress", srv=None, sport=SPORT,
              cli=None, cport=CPORT) -> None:
    """Opens a connection as a real one starts: the client's SYN at the hook opposite the
    server's, then the server's SYN-ACK at `server_dir`. Its counters are not the test's
    (each check() compares the deltas of one frame)."""
    tcpx = tcp4 if family == 4 else tcp6
    srv = srv or (SRV4 if family == 4 else SRV6)
    cli = cli or (CLI4 if family == 4 else CLI6)
    client_dir = "ingress" if server_dir == "egress" else "egress"
    send(clf, tcpx(cli, cport, srv, sport, flags=TCP_SYN, seq=1, ack=0), client_dir)
    send(clf, tcpx(srv, sport, cli, cport, flags=TCP_SYN | TCP_ACK, seq=7, ack=2), server_dir)


def resp4(code: int | bytes = 200, src=SRV4, sport=SPORT, dst=CLI4, dport=CPORT, **kw) -> bytes:
    payload = code if isinstance(code, bytes) else b"HTTP/1.1 %03d Reason\r\n\r\n" % code
    return tcp4(src, sport, dst, dport, payload, **kw)


def resp6(code: int | bytes = 200, src=SRV6, sport=SPORT, dst=CLI6, dport=CPORT, **kw) -> bytes:
    payload = code if isinstance(code, bytes) else b"HTTP/1.1 %03d Reason\r\n\r\n" % code
    return tcp6(src, sport, dst, dport, payload, **kw)


def key4(a=SRV4, pa=SPORT, b=CLI4, pb=CPORT) -> FlowKey:
    return FlowKey.from_endpoints(a, pa, b, pb)


def key6(a=SRV6, pa=SPORT, b=CLI6, pb=CPORT) -> FlowKey:
    return FlowKey.from_endpoints(a, pa, b, pb)


def empty_stats(**kw) -> dict:
    s = {cls: 0 for cls in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")}
    s.update(mirrored_packets=0, mirrored_bytes=0)
    s.update({f"h2_{cls}": 0 for cls in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")})
    s.update(grpc_ok=0, grpc_error=0)
    s.update(kw)
    return s


def tx_packets(iface) -> int:
    return int(Path(f"/sys/class/net/{iface.name}/statistics/tx_packets").read_text())


# --- the frame helper itself -----------------------------------------------------------

@pytest.mark.unit
def test_frames_parse_with_dpkt():
    """The crafted frames are what they claim to be, checksums included."""
    dpkt = pytest.importorskip("dpkt")
    f = resp4(200, ip={"options": ipv4_options(40)}, options=tcp_options(40), vlans=[7])
    e = dpkt.ethernet.Ethernet(f)
    ip = e.data
    assert (e.vlan_tags[0].id, ip.hl, ip.len, ip.data.off) == (7, 15, len(f) - 18, 15)
    assert ip.data.data.startswith(b"HTTP/1.1 200 ")
    raw_ip = f[18:]
    assert F.checksum(raw_ip[:60]) == 0
    pseudo = raw_ip[12:20] + bytes([0, IPPROTO_TCP]) + (len(raw_ip) - 60).to_bytes(2, "big")
    assert F.checksum(pseudo + raw_ip[60:]) == 0

    f6 = resp6(503, ip={"ext": [hop_by_hop(1), dest_opts(), routing(2), fragment(0, True),
                                dest_opts(3)]})
    ip6 = dpkt.ethernet.Ethernet(f6).data
    assert list(ip6.extension_hdrs) == [0, 60, 43, 44]
    assert ip6.data.data.startswith(b"HTTP/1.1 503 ")
    assert len(f6) == 14 + 40 + 16 + 8 + 24 + 8 + 32 + 20 + len(b"HTTP/1.1 503 Reason\r\n\r\n")


@pytest.mark.testrun
def test_short_frame_rejected(clf):
    """BPF_PROG_TEST_RUN needs a whole Ethernet header; shorter frames never reach the
    program and count nothing."""
    with pytest.raises(ValueError):
        clf.test_run("egress", eth(b"")[:13])
    assert not any(clf.counters().values())


# --- parse paths -----------------------------------------------------------------------

def _cases():
    c = []

    def add(name, frame, expected):
        c.append(pytest.param(frame, expected, id=name))

    syn = dict(flags=TCP_SYN, options=tcp_options(20), seq=1, ack=0)
    # IPv4, valid.
    add("ipv4-syn-no-payload", tcp4(CLI4, CPORT, SRV4, SPORT, **syn), TCP4)
    add("ipv4-ack-no-payload", tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_ACK), TCP4)
    add("ipv4-request", tcp4(CLI4, CPORT, SRV4, SPORT, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        TCP4)
    add("ipv4-response", resp4(200), counts(TCP4, RESP["2xx"]))
    for ihl in range(5, 16):
        add(f"ipv4-ihl{ihl}", resp4(200, ip={"options": ipv4_options(4 * (ihl - 5))}),
            counts(TCP4, RESP["2xx"]))
    for doff in range(5, 16):
        add(f"tcp4-doff{doff}", resp4(200, options=tcp_options(4 * (doff - 5))),
            counts(TCP4, RESP["2xx"]))
    add("ipv4-ihl15-doff15", resp4(301, ip={"options": ipv4_options(40)},
                                   options=tcp_options(40)), counts(TCP4, RESP["3xx"]))
    add("ipv4-df", resp4(200, ip={"df": True}), counts(TCP4, RESP["2xx"]))
    add("ipv4-first-fragment", resp4(200, ip={"mf": True}), counts(TCP4, RESP["2xx"]))
    add("ipv4-tot-len-0-big-tcp", resp4(200, ip={"tot_len": 0}), counts(TCP4, RESP["2xx"]))
    add("ipv4-tot-len-beyond-frame",
        resp4(200, ip={"tot_len": 40 + len(b"HTTP/1.1 200 Reason\r\n\r\n") + 100}),
        counts(TCP4, RESP["2xx"]))
    add("ipv4-tot-len-headers-only", resp4(200, ip={"tot_len": 40}), TCP4)
    add("ipv4-tot-len-cuts-status-line", resp4(200, ip={"tot_len": 40 + 12}), TCP4)
    # 12 payload bytes, then bytes outside the IP packet (Ethernet padding) that would
    # complete the status line if the classifier read past the total length.
    add("ipv4-padding-after-short-payload", resp4(b"HTTP/1.1 200", trailer=b" OK\r\n\0\0\0"),
        TCP4)
    add("vlan-8021q-ipv4", resp4(200, vlans=[100]), counts(TCP4, RESP["2xx"]))
    add("vlan-8021ad-ipv4", resp4(200, vlans=[(F.ETH_P_8021AD, 100)]),
        counts(TCP4, RESP["2xx"]))
    add("vlan-8021q-ipv6", resp6(200, vlans=[4094]), counts(TCP6, RESP["2xx"]))
    add("vlan-8021ad-ipv6", resp6(200, vlans=[(F.ETH_P_8021AD, 1)]), counts(TCP6, RESP["2xx"]))

    # Only one tag is parsed: a second one leaves an 802.1Q ethertype, which is "other".
    add("qinq-8021ad-8021q-ipv4", resp4(200, vlans=[(F.ETH_P_8021AD, 10), 20]),
        counts(PKT, other=1))
    add("qinq-8021q-8021q-ipv4", resp4(200, vlans=[10, 20]), counts(PKT, other=1))
    add("qinq-8021ad-8021ad-ipv6", resp6(200, vlans=[(F.ETH_P_8021AD, 10),
                                                     (F.ETH_P_8021AD, 20)]),
        counts(PKT, other=1))

    # Truncated link layer and truncated fixed IP headers. The kernel refuses untagged
    # IPv4/IPv6 frames shorter than the fixed IP header (test_ip_header_cut_untagged), so
    # those paths are reached behind a VLAN tag, whose ethertype the kernel does not parse.
    add("eth-only-vlan-ethertype", eth(b"", F.ETH_P_8021Q), counts(PKT, malformed=1))
    add("eth-only-8021ad-ethertype", eth(b"", F.ETH_P_8021AD), counts(PKT, malformed=1))
    for n in (1, 3):
        add(f"vlan-tag-cut-{n}", cut(resp4(200, vlans=[5]), 14 + n), counts(PKT, malformed=1))
    for n in (0, 1, 10, 19):
        add(f"vlan-ipv4-header-cut-{n}", cut(resp4(200, vlans=[5]), 18 + n),
            counts(PKT, malformed=1))
    for n in (0, 1, 20, 39):
        add(f"vlan-ipv6-header-cut-{n}", cut(resp6(200, vlans=[5]), 18 + n),
            counts(PKT, malformed=1))
    add("vlan-ipv4-header-only", cut(resp4(200, vlans=[5]), 18 + 20), counts(IP4, malformed=1))
    add("vlan-ipv6-header-only", cut(resp6(200, vlans=[5]), 18 + 40), counts(IP6, malformed=1))
    add("vlan-tcp4-header-cut", cut(resp4(200, vlans=[5]), 18 + 20 + 19),
        counts(IP4, malformed=1))
    add("vlan-tcp6-header-cut", cut(resp6(200, vlans=[5]), 18 + 40 + 19),
        counts(IP6, malformed=1))
    add("vlan-ipv4-bogus-ihl", resp4(200, vlans=[5], ip={"ihl": 4}), counts(IP4, malformed=1))

    # IPv4, malformed.
    add("ipv4-header-only", cut(resp4(200), 14 + 20), counts(IP4, malformed=1))
    add("ipv4-version-6", resp4(200, ip={"version": 6}), counts(IP4, malformed=1))
    add("ipv4-version-0", resp4(200, ip={"version": 0}), counts(IP4, malformed=1))
    for ihl in range(0, 5):
        add(f"ipv4-bogus-ihl{ihl}", resp4(200, ip={"ihl": ihl}), counts(IP4, malformed=1))
    add("ipv4-ihl15-without-options", resp4(200, ip={"ihl": 15, "tot_len": 200}),
        counts(IP4, malformed=1))
    add("ipv4-tot-len-below-20", resp4(200, ip={"tot_len": 19}), counts(IP4, malformed=1))
    add("ipv4-tot-len-below-ihl", resp4(200, ip={"options": ipv4_options(12), "tot_len": 28}),
        counts(IP4, malformed=1))
    add("ipv4-tot-len-below-tcp-header", resp4(200, ip={"tot_len": 20 + 19}),
        counts(IP4, malformed=1))
    add("ipv4-tot-len-below-tcp-options",
        resp4(200, options=tcp_options(20), ip={"tot_len": 20 + 39}), counts(IP4, malformed=1))
    for n in (0, 1, 19):
        add(f"tcp4-header-cut-{n}", cut(resp4(200), 14 + 20 + n), counts(IP4, malformed=1))
    add("tcp4-header-cut-after-options",
        cut(resp4(200, ip={"options": ipv4_options(40)}), 14 + 60 + 10), counts(IP4, malformed=1))
    for doff in range(0, 5):
        add(f"tcp4-bogus-doff{doff}", resp4(200, doff=doff), counts(IP4, malformed=1))
    add("tcp4-doff15-beyond-frame", resp4(b"HTTP/1.1 500 x", doff=15), counts(IP4, malformed=1))
    add("tcp4-options-cut", cut(resp4(200, options=tcp_options(20)), 14 + 20 + 30),
        counts(IP4, malformed=1))

    # IPv4, other.
    for off in (1, 185, 0x1FFF):
        add(f"ipv4-nonfirst-fragment-{off}", resp4(500, ip={"frag_offset": off, "mf": True}),
            counts(IP4, other=1))
    add("ipv4-last-fragment", resp4(500, ip={"frag_offset": 3}), counts(IP4, other=1))
    add("ipv4-nonfirst-fragment-bogus-tot-len", resp4(500, ip={"frag_offset": 1, "tot_len": 3}),
        counts(IP4, other=1))
    add("ipv4-udp", F.udp4(SRV4, 53, CLI4, 5353, b"HTTP/1.1 500 Internal\r\n"),
        counts(IP4, other=1))
    add("ipv4-icmp", eth(ipv4(b"\x08\0\0\0\0\1\0\1", CLI4, SRV4, IPPROTO_ICMP)),
        counts(IP4, other=1))
    add("ipv4-udp-in-vlan", F.udp4(SRV4, 53, CLI4, 5353, b"x", vlans=[9]), counts(IP4, other=1))

    # Not IP.
    add("arp-request", F.arp_frame(CLI4, SRV4, 1), counts(PKT, other=1))
    add("arp-reply", F.arp_frame(SRV4, CLI4, 2), counts(PKT, other=1))
    add("arp-in-vlan", F.arp_frame(CLI4, SRV4, vlans=[3]), counts(PKT, other=1))
    add("lldp", eth(b"\x02\x07\x04" + b"\0" * 40, F.ETH_P_LLDP), counts(PKT, other=1))
    add("ieee8023-length-field", eth(b"\xaa\xaa\x03" + b"\0" * 43, 46), counts(PKT, other=1))

    # IPv6, valid.
    add("ipv6-syn-no-payload", tcp6(CLI6, CPORT, SRV6, SPORT, **syn), TCP6)
    add("ipv6-response", resp6(200), counts(TCP6, RESP["2xx"]))
    for name, ext in [("hop-by-hop", hop_by_hop()), ("hop-by-hop-long", hop_by_hop(5)),
                      ("routing", routing()), ("routing-long", routing(4)),
                      ("dest-opts", dest_opts()), ("dest-opts-long", dest_opts(2)),
                      ("fragment-first", fragment(0, more=True)),
                      ("fragment-atomic", fragment(0, more=False))]:
        add(f"ipv6-{name}", resp6(200, ip={"ext": [ext]}), counts(TCP6, RESP["2xx"]))
    add("ipv6-chain-hbh-dst-rt-frag-dst",
        resp6(404, ip={"ext": [hop_by_hop(1), dest_opts(), routing(2), fragment(0, True),
                               dest_opts(3)]}), counts(TCP6, RESP["4xx"]))
    six = [hop_by_hop(), dest_opts(1), routing(), dest_opts(), fragment(0, True), dest_opts(2)]
    add("ipv6-chain-6-max", resp6(200, ip={"ext": six}), counts(TCP6, RESP["2xx"]))
    # A seventh extension header: the classifier gives up and counts "other".
    add("ipv6-chain-7-too-long", resp6(200, ip={"ext": six + [dest_opts()]}),
        counts(IP6, other=1))
    add("ipv6-payload-len-0-jumbo", resp6(200, ip={"payload_len": 0}), counts(TCP6, RESP["2xx"]))
    add("ipv6-payload-len-0-jumbo-with-ext",
        resp6(200, ip={"payload_len": 0, "ext": [hop_by_hop(), fragment()]}),
        counts(TCP6, RESP["2xx"]))
    add("ipv6-payload-len-beyond-frame", resp6(200, ip={"payload_len": 1000}),
        counts(TCP6, RESP["2xx"]))
    add("ipv6-payload-len-cuts-status-line", resp6(200, ip={"payload_len": 20 + 12}), TCP6)
    add("ipv6-payload-len-headers-only", resp6(200, ip={"payload_len": 20}), TCP6)
    add("ipv6-padding-after-short-payload", resp6(b"HTTP/1.1 200", trailer=b" OK\r\n"), TCP6)
    add("ipv6-payload-len-cuts-status-after-ext",
        resp6(200, ip={"ext": [hop_by_hop(1)], "payload_len": 16 + 20 + 12}), TCP6)

    # IPv6, malformed.
    add("ipv6-header-only", cut(resp6(200), 14 + 40), counts(IP6, malformed=1))
    add("ipv6-version-4", resp6(200, ip={"version": 4}), counts(IP6, malformed=1))
    for n in (0, 3):
        add(f"ipv6-ext-header-cut-{n}", cut(resp6(200, ip={"ext": [hop_by_hop()]}), 54 + n),
            counts(IP6, malformed=1))
    add("ipv6-ext-header-cut-in-chain",
        cut(resp6(200, ip={"ext": [hop_by_hop(), routing(), dest_opts()]}), 54 + 16 + 2),
        counts(IP6, malformed=1))
    add("ipv6-ext-header-len-beyond-frame", resp6(200, ip={"ext": [hop_by_hop(hdrlen=255)]}),
        counts(IP6, malformed=1))
    add("ipv6-ext-header-len-past-tcp-header",
        tcp6(CLI6, CPORT, SRV6, SPORT, flags=TCP_SYN, ip={"ext": [dest_opts(hdrlen=1)]}),
        counts(IP6, malformed=1))
    add("ipv6-payload-len-below-tcp-header", resp6(200, ip={"payload_len": 19}),
        counts(IP6, malformed=1))
    add("ipv6-payload-len-below-ext-headers",
        resp6(200, ip={"ext": [hop_by_hop(1)], "payload_len": 16 + 19}), counts(IP6, malformed=1))
    add("ipv6-payload-len-below-tcp-options",
        resp6(200, options=tcp_options(12), ip={"payload_len": 31}), counts(IP6, malformed=1))
    for n in (0, 19):
        add(f"tcp6-header-cut-{n}", cut(resp6(200), 14 + 40 + n), counts(IP6, malformed=1))
    add("tcp6-header-cut-after-ext", cut(resp6(200, ip={"ext": [fragment()]}), 14 + 48 + 12),
        counts(IP6, malformed=1))
    add("tcp6-bogus-doff4", resp6(200, doff=4), counts(IP6, malformed=1))
    add("tcp6-doff15-beyond-frame", resp6(b"HTTP/1.1 500 x", doff=15), counts(IP6, malformed=1))

    # IPv6, other.
    for off in (1, 0x1FFF):
        add(f"ipv6-nonfirst-fragment-{off}", resp6(500, ip={"ext": [fragment(off, True)]}),
            counts(IP6, other=1))
    add("ipv6-last-fragment-after-hbh",
        resp6(500, ip={"ext": [hop_by_hop(), fragment(7, False)]}), counts(IP6, other=1))
    add("ipv6-udp", F.udp6(SRV6, 53, CLI6, 5353, b"HTTP/1.1 500 Internal\r\n"),
        counts(IP6, other=1))
    add("ipv6-udp-after-dest-opts",
        F.udp6(SRV6, 53, CLI6, 5353, b"HTTP/1.1 500 x", ip={"ext": [dest_opts()]}),
        counts(IP6, other=1))
    add("ipv6-icmpv6", eth(ipv6(b"\x80\0\0\0\0\1\0\1", CLI6, SRV6, IPPROTO_ICMPV6),
                           F.ETH_P_IPV6), counts(IP6, other=1))
    add("ipv6-no-next-header", eth(ipv6(b"", CLI6, SRV6, IPPROTO_NONE, ext=[dest_opts()]),
                                   F.ETH_P_IPV6), counts(IP6, other=1))
    # AH (51) is not among the skipped extension headers: TCP behind it is not looked at.
    ah = bytes([IPPROTO_TCP, 4]) + b"\0" * 22
    add("ipv6-ah-then-tcp", eth(ipv6(ah + tcp(SPORT, CPORT, ERR500), SRV6, CLI6, 51),
                                F.ETH_P_IPV6), counts(IP6, other=1))
    return c


@pytest.mark.testrun
@pytest.mark.parametrize("frame, expected", _cases())
@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_parse_path(clf, frame, expected, direction):
    open_conn(clf, 4, direction)
    open_conn(clf, 6, direction)
    check(clf, frame, expected, direction)
    assert clf.flows() == {}
    classes = {k[5:]: v for k, v in expected.items() if k.startswith("resp_")}
    assert clf.iface_stats() == ({(LO_IFINDEX, direction): empty_stats(**classes)}
                                 if classes else {})


@pytest.mark.testrun
@pytest.mark.parametrize("frame", [
    pytest.param(cut(resp4(200), 14 + n), id=f"ipv4-{n}") for n in (0, 1, 19)] + [
    pytest.param(cut(resp6(200), 14 + n), id=f"ipv6-{n}") for n in (0, 1, 39)])
def test_ip_header_cut_untagged(clf, frame):
    """Untagged frames cut inside the fixed IPv4/IPv6 header: this kernel's test run
    rejects them with EINVAL before the program runs (the classifier's handling of the
    same truncation is covered behind a VLAN tag); a kernel that runs them must count
    them as malformed."""
    before = clf.counters()
    try:
        res = clf.test_run("egress", frame)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        assert clf.counters() == before
        return
    assert res.retval == TC_ACT_UNSPEC
    after = clf.counters()
    assert {k: after[k] - before[k] for k in COUNTERS if after[k] != before[k]} == counts(
        PKT, malformed=1)


# --- status lines ----------------------------------------------------------------------

@pytest.mark.testrun
@pytest.mark.parametrize("code, cls", [
    (100, "1xx"), (101, "1xx"), (199, "1xx"), (200, "2xx"), (204, "2xx"), (299, "2xx"),
    (301, "3xx"), (304, "3xx"), (399, "3xx"), (400, "4xx"), (404, "4xx"), (499, "4xx"),
    (500, "5xx"), (503, "5xx"), (599, "5xx"),
    (1, "other"), (99, "other"), (600, "other"), (700, "other"), (999, "other"),
])
def test_status_class(clf, code, cls):
    clf.set_trigger(frozenset())
    open_conn(clf, 4)
    open_conn(clf, 6)
    for version, frame, base in ((b"1.1", resp4, TCP4), (b"1.0", resp6, TCP6)):
        payload = b"HTTP/%s %03d Whatever\r\n\r\n" % (version, code)
        check(clf, frame(payload), counts(base, RESP[cls]))
    assert clf.flow_count() == 0
    assert clf.iface_stats() == {(LO_IFINDEX, "egress"): empty_stats(**{cls: 2})}


@pytest.mark.testrun
@pytest.mark.parametrize("payload", [
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n",
    b"HTTP/1.1 200 ",               # exactly 13 bytes
    b"HTTP/1.1 200\r",              # exactly 13 bytes, CR right after the code
    b"HTTP/1.1 204\r\nServer: x\r\n\r\n",
    b"HTTP/1.0 200\r\n",
    b"HTTP/1.1 200 " + b"x" * 1400,
], ids=lambda p: repr(p[:16])[2:-1])
def test_status_line_accepted(clf, payload):
    open_conn(clf, 4)
    check(clf, resp4(payload), counts(TCP4, RESP["2xx"]))


NEAR_MISSES = [
    b"HTTP/1.1 50",                 # too short
    b"HTTP/1.1 500",                # 12 bytes: no room for the terminator
    b"HTTP/2 500 ",
    b"HTTP/2 500 Internal Server Error\r\n",
    b"HTTP/1.1 5000",
    b"HTTP/1.1 5000 Internal\r\n",
    b"http/1.1 500 ",
    b"Http/1.1 500 Internal\r\n",
    b"HTTP/1.2 500 ",
    b"HTTP/1.  500 ",
    b"HTTP/0.9 500 ",
    b"HTTP/11 500 Internal\r\n",
    b"HTTP/1,1 500 ",
    b"HTTPS/1.1 500 ",
    b" HTTP/1.1 500 ",
    b"\r\nHTTP/1.1 500 x",
    b"\0HTTP/1.1 500 ",
    b"HTTP/1.1 5x0 ",
    b"HTTP/1.1 50x ",
    b"HTTP/1.1 x00 ",
    b"HTTP/1.1 5 0 ",
    b"HTTP/1.1 -50 ",
    b"HTTP/1.1 5\xb00 ",            # a high byte between the digits
    b"HTTP/1.1 500\n",              # LF, not CR
    b"HTTP/1.1 500\t",
    b"HTTP/1.1 500-",
    b"HTTP/1.1 500:",
    b"HTTP/1.1  500 ",
    b"HTTP/1.1\t500 ",
    b"HTTP/1.1\r500 ",
    b"HTTP/1.1 500\0",
    b"GET /500 HTTP/1.1\r\n\r\n",
]


@pytest.mark.testrun
def test_status_000_counts_as_other(clf):
    open_conn(clf, 4)
    assert send(clf, resp4(b"HTTP/1.1 000 Zero\r\n")) == counts(TCP4, RESP["other"])


@pytest.mark.testrun
@pytest.mark.parametrize("payload", NEAR_MISSES, ids=lambda p: repr(p)[2:-1])
def test_status_line_near_miss(clf, payload):
    open_conn(clf, 4)
    open_conn(clf, 6, "ingress")
    check(clf, resp4(payload), TCP4)
    check(clf, resp6(payload), TCP6, "ingress")
    assert clf.flow_count() == 0
    assert clf.iface_stats() == {}


@pytest.mark.testrun
def test_status_line_split_across_segments(clf):
    """A status line is only recognised whole at the start of one segment."""
    open_conn(clf, 4)
    check(clf, resp4(b"HTTP/1.1 50"), TCP4)
    check(clf, resp4(b"0 Internal Server Error\r\n"), TCP4)
    assert clf.flow_count() == 0


@pytest.mark.testrun
def test_non_tcp_status_line_not_counted(clf):
    check(clf, F.udp4(SRV4, SPORT, CLI4, CPORT, ERR500), counts(IP4, other=1))
    check(clf, F.udp6(SRV6, SPORT, CLI6, CPORT, ERR500), counts(IP6, other=1))
    check(clf, eth(ipv4(ERR500, SRV4, CLI4, IPPROTO_UDP)), counts(IP4, other=1))
    assert clf.flow_count() == 0 and clf.iface_stats() == {}


# --- marking and mirroring -------------------------------------------------------------

@pytest.mark.testrun
@pytest.mark.parametrize("family", [4, 6])
def test_trigger_marks_flow_and_mirrors(clf, debug_iface, family):
    tcpx, base, key = (tcp4, TCP4, key4()) if family == 4 else (tcp6, TCP6, key6())
    srv, cli = (SRV4, CLI4) if family == 4 else (SRV6, CLI6)
    syn = tcpx(cli, CPORT, srv, SPORT, flags=TCP_SYN, options=tcp_options(20))
    check(clf, syn, counts(base, conns_started=1), "ingress")
    synack = tcpx(srv, SPORT, cli, CPORT, flags=TCP_SYN | TCP_ACK)
    check(clf, synack, base)
    assert clf.flows() == {}

    resp = tcpx(srv, SPORT, cli, CPORT, ERR500)
    tx = tx_packets(debug_iface)
    t0 = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)   # the classifier's clock
    check(clf, resp, counts(base, RESP["5xx"], mirrored(resp), flows_marked=1, events=1,
                            errors=1, resp_no_request=1))
    t1 = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    assert tx_packets(debug_iface) == tx + 1, "the clone did not leave the debug interface"

    flows = clf.flows()
    assert list(flows) == [key]
    f = flows[key]
    assert (f["packets"], f["bytes"], f["status"], f["ifindex"]) == (1, len(resp), 500,
                                                                     LO_IFINDEX)
    assert clf.errors() == {(LO_IFINDEX, 500, "h1"): 1}
    assert t0 <= f["first_ns"] == f["last_ns"] <= t1
    assert clf.iface_stats() == {
        (LO_IFINDEX, "egress"): empty_stats(**{"5xx": 1}, mirrored_packets=1,
                                            mirrored_bytes=len(resp))}


@pytest.mark.testrun
@pytest.mark.parametrize("code", [200, 204, 301, 404, 499, 600, 99, 1])
def test_non_trigger_code_does_not_mark(clf, code):
    cls = "other" if not 100 <= code < 600 else f"{code // 100}xx"
    open_conn(clf, 4)
    open_conn(clf, 6, "ingress")
    f4, f6 = resp4(code), resp6(code)
    check(clf, f4, counts(TCP4, RESP[cls]))
    check(clf, f6, counts(TCP6, RESP[cls]), "ingress")
    assert clf.flows() == {}
    # Later packets of those connections are not mirrored either.
    check(clf, tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_ACK), TCP4, "ingress")
    check(clf, tcp6(CLI6, CPORT, SRV6, SPORT, flags=TCP_ACK), TCP6)


@pytest.mark.testrun
@pytest.mark.parametrize("family", [4, 6])
def test_later_packets_mirrored_both_directions_and_hooks(clf, family):
    tcpx, udpx, base, key = ((tcp4, F.udp4, TCP4, key4()) if family == 4
                             else (tcp6, F.udp6, TCP6, key6()))
    srv, cli = (SRV4, CLI4) if family == 4 else (SRV6, CLI6)
    open_conn(clf, family)
    first = tcpx(srv, SPORT, cli, CPORT, ERR500)
    check(clf, first, counts(base, ERROR500, mirrored(first)))

    total = len(first)
    later = [
        ("ingress", tcpx(cli, CPORT, srv, SPORT, flags=TCP_ACK)),                 # client ACK
        ("egress", tcpx(srv, SPORT, cli, CPORT, b"<html>error page</html>")),     # body
        ("egress", tcpx(cli, CPORT, srv, SPORT, b"GET /again HTTP/1.1\r\n\r\n")),  # other hook
        ("ingress", tcpx(srv, SPORT, cli, CPORT, flags=TCP_FIN | TCP_ACK)),
        ("ingress", tcpx(cli, CPORT, srv, SPORT, b"x" * 12)),
    ]
    for direction, frame in later:
        check(clf, frame, counts(base, mirrored(frame)), direction)
        total += len(frame)

    # Not part of the marked TCP connection: not mirrored.
    check(clf, tcpx(cli, CPORT + 1, srv, SPORT, flags=TCP_SYN), counts(base, conns_started=1),
          "ingress")
    check(clf, tcpx(srv, SPORT + 1, cli, CPORT, flags=TCP_ACK), base)
    check(clf, udpx(cli, CPORT, srv, SPORT, b"HTTP/1.1 500 x"), counts(base, tcp=-1, other=1))
    malformed = tcpx(cli, CPORT, srv, SPORT, b"data", doff=3)
    check(clf, malformed, counts(base, tcp=-1, malformed=1), "ingress")

    flows = clf.flows()
    assert list(flows) == [key]
    assert (flows[key]["packets"], flows[key]["bytes"], flows[key]["status"]) == (
        1 + len(later), total, 500)
    assert flows[key]["first_ns"] <= flows[key]["last_ns"]    # coarse clock: same tick


@pytest.mark.testrun
def test_nonfirst_fragment_of_marked_flow_not_mirrored(clf):
    open_conn(clf, 4)
    open_conn(clf, 6)
    check(clf, resp4(500), counts(TCP4, ERROR500, mirrored(resp4(500))))
    check(clf, resp4(b"more", ip={"frag_offset": 2}), counts(IP4, other=1))
    check(clf, resp6(500), counts(TCP6, ERROR500, mirrored(resp6(500))))
    check(clf, resp6(b"more", ip={"ext": [fragment(2)]}), counts(IP6, other=1))
    assert {k: v["packets"] for k, v in clf.flows().items()} == {key4(): 1, key6(): 1}


@pytest.mark.testrun
@pytest.mark.parametrize("srv, sport, cli, cport", [
    (SRV4, 80, CLI4, 40000),                            # server address lower
    ("198.19.255.254", 80, "198.18.0.1", 40000),        # server address higher
    ("198.18.0.255", 80, "198.18.1.0", 40000),          # byte order of the address
    ("198.18.1.0", 80, "198.18.0.255", 40000),
    ("198.18.3.3", 8080, "198.18.3.3", 40000),          # same address: port decides
    ("198.18.3.3", 512, "198.18.3.3", 511),             # byte order of the port
    ("198.18.3.3", 511, "198.18.3.3", 512),
    ("2001:db8::80", 443, "2001:db8::7", 50000),        # differ in the last word only
    ("2001:db8::7", 443, "2001:db8::80", 50000),
    ("2001:db8:1::1", 443, "2001:db8::ffff:ffff", 50000),  # first word decides
    ("2001:db8::ffff:ffff", 443, "2001:db8:1::1", 50000),
    ("2001:db8::1:0", 443, "2001:db8::ff", 50000),      # byte order within a word
])
def test_flow_key_normalised(clf, srv, sport, cli, cport):
    tcpx, base = (tcp6, TCP6) if ":" in srv else (tcp4, TCP4)
    key = FlowKey.from_endpoints(srv, sport, cli, cport)
    assert key == FlowKey.from_endpoints(cli, cport, srv, sport)
    open_conn(clf, 6 if ":" in srv else 4, srv=srv, sport=sport, cli=cli, cport=cport)
    first = tcpx(srv, sport, cli, cport, ERR500)
    check(clf, first, counts(base, ERROR500, mirrored(first)))
    assert list(clf.flows()) == [key]
    back = tcpx(cli, cport, srv, sport, flags=TCP_ACK)
    check(clf, back, counts(base, mirrored(back)), "ingress")
    assert {k: v["packets"] for k, v in clf.flows().items()} == {key: 2}


@pytest.mark.testrun
def test_repeated_trigger_and_non_trigger_response_on_marked_flow(clf):
    open_conn(clf, 4)
    f500, f503, f200, f100 = resp4(500), resp4(503), resp4(200), resp4(100)
    check(clf, f500, counts(TCP4, ERROR500, mirrored(f500)))
    # Already marked: mirrored and reported (an event per error), not marked again, last
    # trigger status kept.
    check(clf, f503, counts(TCP4, RESP["5xx"], mirrored(f503), events=1, errors=1,
                            resp_no_request=1))
    assert clf.flows()[key4()]["status"] == 503
    check(clf, f200, counts(TCP4, RESP["2xx"], mirrored(f200)))
    check(clf, f100, counts(TCP4, RESP["1xx"], mirrored(f100)))
    f = clf.flows()[key4()]
    assert (f["packets"], f["bytes"], f["status"]) == (4, len(f500) * 4, 503)
    assert clf.flow_count() == 1
    assert clf.iface_stats() == {
        (LO_IFINDEX, "egress"): empty_stats(**{"5xx": 2, "2xx": 1, "1xx": 1},
                                            mirrored_packets=4, mirrored_bytes=4 * len(f500))}
    assert clf.errors() == {(LO_IFINDEX, 500, "h1"): 1, (LO_IFINDEX, 503, "h1"): 1}


@pytest.mark.testrun
def test_trigger_change_without_reload(clf):
    fds = {d: clf.fd(d) for d in ("ingress", "egress")}
    for port in range(40001, 40007):
        open_conn(clf, 4, cport=port)
    a = resp4(500, dport=40001)
    check(clf, a, counts(TCP4, ERROR500, mirrored(a)))

    clf.set_trigger(frozenset({404}))
    assert clf.trigger_codes() == frozenset({404})
    b = resp4(503, dport=40002)
    check(clf, b, counts(TCP4, RESP["5xx"]))
    c = resp4(404, dport=40003)
    check(clf, c, counts(TCP4, RESP["4xx"], mirrored(c), flows_marked=1, events=1, errors=1,
                         resp_no_request=1))
    # A flow marked under the old trigger set stays marked.
    a_ack = tcp4(CLI4, 40001, SRV4, SPORT, flags=TCP_ACK)
    check(clf, a_ack, counts(TCP4, mirrored(a_ack)), "ingress")
    assert set(clf.flows()) == {key4(pb=40001), key4(pb=40003)}

    clf.set_trigger(frozenset({999, 100}))
    d, e = resp4(999, dport=40004), resp4(100, dport=40005)
    check(clf, d, counts(TCP4, RESP["other"], mirrored(d), flows_marked=1, events=1, errors=1,
                         resp_no_request=1))
    check(clf, e, counts(TCP4, RESP["1xx"], mirrored(e), flows_marked=1, events=1, errors=1,
                         resp_no_request=1))
    check(clf, resp4(404, dport=40006), counts(TCP4, RESP["4xx"]))
    assert set(clf.flows()) == {key4(pb=p) for p in (40001, 40003, 40004, 40005)}
    assert {d: clf.fd(d) for d in ("ingress", "egress")} == fds


@pytest.mark.testrun
def test_cross_cpu(clf):
    """One state for every CPU: the SYN on CPU 0, the SYN-ACK and the error on CPU 1, the
    client's ACK on CPU 0 again: it is marked, mirrored and counted as one connection."""
    original = os.sched_getaffinity(0)
    if not {0, 1} <= original:
        pytest.skip(f"needs CPUs 0 and 1, this thread may run on {sorted(original)}")
    key = key4()
    try:
        os.sched_setaffinity(0, {0})
        check(clf, tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_SYN), counts(TCP4, conns_started=1),
              "ingress")
        os.sched_setaffinity(0, {1})
        check(clf, tcp4(SRV4, SPORT, CLI4, CPORT, flags=TCP_SYN | TCP_ACK), TCP4)
        first = resp4(500)
        check(clf, first, counts(TCP4, ERROR500, mirrored(first)))
        os.sched_setaffinity(0, {0})
        ack = tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_ACK)
        check(clf, ack, counts(TCP4, mirrored(ack)), "ingress")
        body = tcp4(SRV4, SPORT, CLI4, CPORT, b"<html>oops</html>")
        check(clf, body, counts(TCP4, mirrored(body)))
        f = clf.flows()[key]
        assert (f["packets"], f["bytes"], f["status"]) == (
            3, len(first) + len(ack) + len(body), 500)
        assert 0 < f["first_ns"] <= f["last_ns"]
        assert clf.counters()["flows_marked"] == 1
    finally:
        os.sched_setaffinity(0, original)


@pytest.mark.testrun
def test_flow_status_survives_cpu_change(clf):
    original = os.sched_getaffinity(0)
    if not {0, 1} <= original:
        pytest.skip(f"needs CPUs 0 and 1, this thread may run on {sorted(original)}")
    try:
        os.sched_setaffinity(0, {0})
        open_conn(clf, 4)
        send(clf, resp4(500))
        os.sched_setaffinity(0, {1})
        send(clf, tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_ACK), "ingress")
    finally:
        os.sched_setaffinity(0, original)
    assert clf.flows()[key4()]["status"] == 500


@pytest.mark.testrun
def test_no_debug_interface(clf, debug_iface):
    clf.set_debug_ifindex(0)
    open_conn(clf, 4)
    open_conn(clf, 6)
    first = resp4(500)
    check(clf, first, counts(TCP4, ERROR500, no_debug_if=1))
    assert list(clf.flows()) == [key4()]
    ack = tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_ACK)
    check(clf, ack, counts(TCP4, no_debug_if=1), "ingress")
    check(clf, resp6(502), counts(TCP6, ERROR500, no_debug_if=1))
    assert clf.iface_stats()[(LO_IFINDEX, "egress")] == empty_stats(**{"5xx": 2})

    # A debug interface configured later gets the flows marked meanwhile.
    clf.set_debug_ifindex(debug_iface.ifindex)
    check(clf, ack, counts(TCP4, mirrored(ack)), "ingress")


@pytest.mark.testrun
def test_debug_interface_is_packet_interface(clf):
    """Mirroring a packet to the interface it is on would loop: counted as no_debug_if."""
    clf.set_debug_ifindex(LO_IFINDEX)
    open_conn(clf, 4)
    check(clf, resp4(500), counts(TCP4, ERROR500, no_debug_if=1))
    check(clf, tcp4(CLI4, CPORT, SRV4, SPORT), counts(TCP4, no_debug_if=1), "ingress")


@pytest.mark.testrun
def test_clone_failure(clf, debug_iface):
    clf.set_debug_ifindex(BOGUS_IFINDEX)
    tx = tx_packets(debug_iface)
    open_conn(clf, 6)
    first = resp6(500)
    check(clf, first, counts(TCP6, ERROR500, clone_failures=1))
    ack = tcp6(CLI6, CPORT, SRV6, SPORT, flags=TCP_ACK)
    check(clf, ack, counts(TCP6, clone_failures=1), "ingress")
    check(clf, resp6(503), counts(TCP6, RESP["5xx"], clone_failures=1, events=1, errors=1,
                                  resp_no_request=1))
    assert tx_packets(debug_iface) == tx
    assert list(clf.flows()) == [key6()]
    assert clf.iface_stats() == {(LO_IFINDEX, "egress"): empty_stats(**{"5xx": 2})}


# --- per-interface statistics ----------------------------------------------------------

@pytest.mark.testrun
def test_iface_stats_by_direction(clf):
    plain = [tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_SYN), F.arp_frame(CLI4, SRV4),
             resp4(b"HTTP/2 500 x\r\n"), resp4(200, ip={"frag_offset": 1})]
    for frame in plain:
        send(clf, frame, "ingress")
        send(clf, frame, "egress")
    assert clf.iface_stats() == {}, "packets without a status line touched iface_stats"

    for code in (200, 201, 404, 600):
        open_conn(clf, 4, "ingress", cport=41000 + code)
    for code in (100, 200, 302, 99):
        open_conn(clf, 6, "egress", cport=42000 + code)
    open_conn(clf, 4, "egress", cport=43000)
    for code in (200, 201, 404, 600):
        send(clf, resp4(code, dport=41000 + code), "ingress")
    for code in (100, 200, 302, 302, 99):
        send(clf, resp6(code, dport=42000 + code), "egress")
    marking = resp4(502, dport=43000)
    send(clf, marking, "egress")
    assert clf.iface_stats() == {
        (LO_IFINDEX, "ingress"): empty_stats(**{"2xx": 2, "4xx": 1, "other": 1}),
        (LO_IFINDEX, "egress"): empty_stats(**{"1xx": 1, "2xx": 1, "3xx": 2, "5xx": 1,
                                               "other": 1}, mirrored_packets=1,
                                            mirrored_bytes=len(marking)),
    }
    c = clf.counters()
    assert (c["responses"], c["resp_1xx"], c["resp_2xx"], c["resp_3xx"], c["resp_4xx"],
            c["resp_5xx"], c["resp_other"]) == (10, 1, 3, 2, 1, 1, 2)


@pytest.mark.testrun
def test_iface_stats_mirrored_response_on_ingress(clf):
    open_conn(clf, 4, "ingress")
    marking = resp4(500)
    send(clf, marking, "ingress")
    again = resp4(404)
    check(clf, again, counts(TCP4, RESP["4xx"], mirrored(again)), "ingress")
    assert clf.iface_stats()[(LO_IFINDEX, "ingress")] == empty_stats(
        **{"5xx": 1, "4xx": 1}, mirrored_packets=2, mirrored_bytes=len(marking) + len(again))


@pytest.mark.testrun
def test_iface_stats_count_every_mirrored_packet(clf):
    """Mirrored packets without a status line count in the interface's stats too, under
    the direction they were seen in; unmirrored ones create no entry."""
    open_conn(clf, 4)
    marking = resp4(500)
    send(clf, marking, "egress")
    ack = tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_ACK)
    check(clf, ack, counts(TCP4, mirrored(ack)), "ingress")
    body = tcp4(SRV4, SPORT, CLI4, CPORT, b"<html>" + b"x" * 300 + b"</html>")
    check(clf, body, counts(TCP4, mirrored(body)))
    check(clf, tcp4(CLI4, CPORT + 1, SRV4, SPORT, flags=TCP_ACK), TCP4, "ingress")
    assert clf.iface_stats() == {
        (LO_IFINDEX, "ingress"): empty_stats(mirrored_packets=1, mirrored_bytes=len(ack)),
        (LO_IFINDEX, "egress"): empty_stats(**{"5xx": 1}, mirrored_packets=2,
                                            mirrored_bytes=len(marking) + len(body)),
    }
    c = clf.counters()
    assert (c["mirrored_packets"], c["mirrored_bytes"]) == (
        3, len(marking) + len(ack) + len(body))
