"""What a link event itself says about a new interface (mirror.discovery.LinkEvent), read
from the kernel's real RTM_NEWLINK messages, and the controller's decision that uses it to
attach without a request first: a veth whose peer lives in another namespace (a
container's host end) is never a debug interface; one with both ends here still gets
every check."""
from __future__ import annotations

import os
import select

import pytest
from pyroute2 import IPRoute

from mirror.attachments import Attachments
from mirror.discovery import LinkSocket
from mirror.lab.netns import PREFIX, sh, unique_name

pytestmark = pytest.mark.kernel


def _new_link_events(sock: LinkSocket, names: set[str]) -> dict:
    """name -> the first RTM_NEWLINK event of each of `names` (waits on the socket)."""
    found = {}
    while set(found) != names:
        ready, _, _ = select.select([sock], [], [], 30)
        assert ready, f"no link event for {names - set(found)}"
        for ev in sock.read():
            if ev.kind == "new" and ev.ifname in names and ev.ifname not in found:
                found[ev.ifname] = ev
    return found


def test_link_event_tells_kind_and_where_the_peer_lives():
    ns = f"{PREFIX}-{os.getpid()}-ev"
    container, here_a, here_b = (unique_name("e") for _ in range(3))
    sock = LinkSocket()
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", container, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "link", "add", here_a, "type", "veth", "peer", "name", here_b)
        ev = _new_link_events(sock, {container, here_a, here_b})
        assert (ev[container].link_kind, ev[container].peer_elsewhere) == ("veth", True)
        assert (ev[here_a].link_kind, ev[here_a].peer_elsewhere) == ("veth", False)
        assert (ev[here_b].link_kind, ev[here_b].peer_elsewhere) == ("veth", False)
    finally:
        sock.close()
        for name in (container, here_a):
            sh("ip", "link", "del", name, check=False)
        sh("ip", "netns", "del", ns, check=False)


def test_never_monitor_settles_a_containers_veth_from_its_event(state_dir):
    """The event of a container's host end is enough to say "attach"; the controller's own
    debug interface names are refused whatever the event says; an interface without an
    event (a resync, a freed --max-ifaces place) gets the checks that ask the kernel."""
    ns = f"{PREFIX}-{os.getpid()}-ev2"
    container, here_a, here_b = (unique_name("e") for _ in range(3))
    debug = unique_name("d")
    sock = LinkSocket()
    netlink = IPRoute()
    ctl = Attachments(netlink, "clsact", None, debug)
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", container, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "link", "add", here_a, "type", "veth", "peer", "name", here_b)
        ev = _new_link_events(sock, {container, here_a})
        assert ctl.never_monitor(ev[container].ifindex, container, ev[container]) is False
        assert ctl.never_monitor(ev[here_a].ifindex, here_a, ev[here_a]) is False
        assert ctl.never_monitor(ev[container].ifindex, container) is False
        assert ctl.never_monitor(ev[container].ifindex, debug, ev[container]) is True
        with IPRoute() as ipr:
            gone = max(link["index"] for link in ipr.get_links()) + 1000
        # No such interface: the checks that ask the kernel say "leave it alone".
        assert ctl.never_monitor(gone, here_b) is True
    finally:
        netlink.close()
        sock.close()
        for name in (container, here_a):
            sh("ip", "link", "del", name, check=False)
        sh("ip", "netns", "del", ns, check=False)
