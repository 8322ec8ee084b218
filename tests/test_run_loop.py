"""The controller's run loop under transient failures: an error from the kernel or the
system in one stage (the idle sweep, the interface watch) is logged, counted and retried
with backoff, and the hooks stay in place; the controller does not tear down.

The failures are injected into the real controller's own calls (its classifier's sweep,
its netlink lookups), in-process, while it runs against the real kernel."""
from __future__ import annotations

import errno
import threading

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from helpers import wait_until
from mirror.hooks import tc
from mirror.lab.client import send
from mirror.lab.netns import unique_name
from mirror.metrics import MapCollector

pytestmark = pytest.mark.kernel


class Faulty:
    """Wraps a callable: the first `n` calls raise `exc`, the rest go through."""

    def __init__(self, real, exc, n):
        self.real, self.exc, self.left, self.calls = real, exc, n, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.left:
            self.left -= 1
            raise self.exc
        return self.real(*args, **kw)


@pytest.fixture
def running(host, nginx, state_dir):
    from mirror.controller import Controller, Options
    ctl = Controller(Options(ifaces=[host.host_if], debug_iface=unique_name("d"),
                             idle_timeout=1.0))
    ctl.start()
    loop = threading.Thread(target=ctl.run, daemon=True)
    loop.start()
    try:
        yield ctl
    finally:
        ctl.stop_event.set()
        loop.join(30)
        ctl.close()


def errors_metric(ctl) -> dict[str, float]:
    for family in MapCollector(ctl).collect():
        if family.name == "mirror_controller_errors":
            return {s.labels["stage"]: s.value for s in family.samples}
    raise AssertionError("no mirror_controller_errors metric")


def test_sweep_and_watch_failures_are_retried_not_fatal(running, host):
    ctl = running
    ctl.classifier.expire_idle = Faulty(ctl.classifier.expire_idle,
                                        OSError(errno.ENOMEM, "injected"), 3)
    ctl.attachments.ifname_of = Faulty(ctl.attachments.ifname_of, NetlinkError(errno.ENOBUFS, "injected"), 2)
    # Each stage fails, backs off, and works again.
    wait_until(lambda: (ctl.classifier.expire_idle.calls > 3 and ctl.attachments.ifname_of.calls > 2
                        and not any(ctl._failures.values()), dict(ctl._failures)),
               "both stages to fail and recover")
    assert (ctl.stage_errors["sweep"], ctl.stage_errors["watch"]) == (3, 2)
    assert errors_metric(ctl) == {"reload": 0, "sweep": 3, "watch": 2, "events": 0}
    # Still attached and still mirroring: an error connection is marked.
    assert not ctl.stop_event.is_set() and host.host_if in ctl.attached
    assert [f.name for f in tc.our_filters(ctl.ipr, ctl.attached[host.host_if].ifindex)]
    marked = ctl.classifier.counters()["flows_marked"]
    send(host.ns_v4, host.host_v4, ["/error"])
    assert ctl.classifier.counters()["flows_marked"] == marked + 1


def test_backoff_doubles_up_to_a_bound(running):
    ctl = running
    ctl.classifier.expire_idle = Faulty(ctl.classifier.expire_idle,
                                        OSError(errno.EIO, "injected"), 10 ** 6)
    wait_until(lambda: (ctl._failures.get("sweep", 0) >= 3, dict(ctl._failures)),
               "three sweep failures in a row")
    # The third failure in a row waits 0.5 * 2**2 = 2 s before the next try.
    from mirror.controller import RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS
    n = ctl._failures["sweep"]
    import time
    wait_s = ctl._retry_at["sweep"] - time.monotonic()
    assert wait_s <= min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (n - 1))
    assert not ctl.stop_event.is_set()


def test_a_bug_still_stops_the_loop(host, nginx, state_dir):
    """What is not an error from the kernel or the system is not retried: the loop ends
    (and the caller detaches), as before."""
    from mirror.controller import Controller, Options
    ctl = Controller(Options(ifaces=[host.host_if], debug_iface=unique_name("d")))
    ctl.start()
    try:
        ctl.classifier.expire_idle = Faulty(ctl.classifier.expire_idle, TypeError("bug"), 1)
        with pytest.raises(TypeError):
            ctl.run()
    finally:
        ctl.close()
    assert ctl.attached == {}
