"""Community ID v1 (mirror.communityid) against the spec's own reference data
(corelight/community-id-spec, baseline/baseline_deflt.json and baseline_seed1.json: the
vectors of the protocols implemented here, transcribed), and against tshark's
implementation on frames written here."""
from __future__ import annotations

import socket
import subprocess

import dpkt
import pytest

from mirror.communityid import community_id, of_flow
from mirror.flowkey import FlowKey

pytestmark = pytest.mark.unit

V6_A, V6_B = "2001:470:e5bf:dead:4957:2174:e82c:4887", "2607:f8b0:400c:c03::1a"

# (proto, saddr, daddr, sport, dport, seed 0, seed 1); each listed in both directions.
VECTORS = [
    (6, V6_A, V6_B, 63943, 25,
     "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=", "1:eJYTW6AOzFLlSUoESovMjnu7rMw="),
    (6, "128.232.110.120", "66.35.250.204", 34855, 80,
     "1:LQU9qZlK+B5F3KDmev6m5PMibrg=", "1:3V71V58M3Ksw/yuFALMcW0LAHvc="),
    (17, "192.168.1.52", "8.8.8.8", 54585, 53,
     "1:d/FP5EW3wiY1vCndhwleRRKHowQ=", "1:Q9We8WO3piVF8yEQBNJF4uiSVrI="),
    (132, "192.168.170.8", "192.168.170.56", 7, 7,
     "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs=", "1:5w3ZRjeKBzqT3zsaEECDGjUbYeg="),
    (46, "10.1.12.1", "10.1.12.2", None, None,
     "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw=", "1:rYir8gphR31noO9iDRQmF/BteEI="),
]


@pytest.mark.parametrize("proto,saddr,daddr,sport,dport,want0,want1", VECTORS,
                         ids=["tcp6", "tcp4", "udp", "sctp", "rsvp"])
def test_spec_vectors_both_directions(proto, saddr, daddr, sport, dport, want0, want1):
    for seed, want in ((0, want0), (1, want1)):
        assert community_id(saddr, daddr, sport, dport, proto, seed) == want
        assert community_id(daddr, saddr, dport, sport, proto, seed) == want


def test_flow_key_and_refusals():
    key = FlowKey.from_endpoints("66.35.250.204", 80, "128.232.110.120", 34855)
    assert of_flow(key) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    for bad in [("10.0.0.1", "::1", 1, 2, 6, 0), ("10.0.0.1", "10.0.0.2", 70000, 2, 6, 0),
                ("10.0.0.1", "10.0.0.2", None, 2, 6, 0), ("10.0.0.1", "10.0.0.2", 1, 2, 6, -1),
                ("10.0.0.1", "10.0.0.2", 8, 0, 1, 0)]:
        with pytest.raises(ValueError):
            community_id(*bad)


def test_same_as_tshark(tmp_path):
    """Wireshark implements the spec too: its `communityid` field of each frame equals
    ours, for IPv4 and IPv6, equal addresses (the ports decide) and either direction."""
    flows = [("198.18.9.1", 41000, "198.18.9.2", 80), ("2001:db8:9::2", 80, "2001:db8:9::1", 443),
             ("198.18.9.1", 8080, "198.18.9.1", 80), ("198.18.9.3", 1, "198.18.9.2", 65535)]
    frames = []
    for src, sport, dst, dport in flows:
        tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=1, flags=dpkt.tcp.TH_SYN, win=100)
        if ":" in src:
            ip = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src),
                              dst=socket.inet_pton(socket.AF_INET6, dst), nxt=6, hlim=64,
                              plen=len(bytes(tcp)), data=tcp)
            ip.extension_hdrs = {}
            etype = dpkt.ethernet.ETH_TYPE_IP6
        else:
            ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=6,
                            ttl=64, data=tcp)
            ip.len = 20 + len(bytes(tcp))
            etype = dpkt.ethernet.ETH_TYPE_IP
        frames.append(bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6,
                                                   type=etype, data=ip)))
    path = tmp_path / "c.pcap"
    with open(path, "wb") as f:
        writer = dpkt.pcap.Writer(f)
        for n, fr in enumerate(frames):
            writer.writepkt(fr, ts=1.0 + n)
    out = subprocess.run(["tshark", "-r", str(path), "--enable-protocol", "communityid",
                          "-T", "fields", "-e", "communityid"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [community_id(*f[::2], *f[1::2]) for f in flows]
