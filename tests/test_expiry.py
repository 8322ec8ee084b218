"""Idle expiry against the real maps: a marked connection idle past the idle timeout is
left out of the marked flows at once, unmarked by the classifier at its next packet, and
counted once by the controller's sweep; the lookup pre-filter follows the marks."""
from __future__ import annotations

import os
import time

import pytest

from helpers import next_coarse_tick
from test_flood import RESPONSE, frame, syn
from mirror import bpfsys
from mirror.flowkey import FlowKey

pytestmark = pytest.mark.testrun

KEY = FlowKey.from_endpoints("198.18.0.1", 80, "198.19.0.7", 1024 + 7)


def mark(clf) -> None:
    original = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(original)})
    try:
        assert bpfsys.test_run(clf.fd("ingress"), syn(7, 1024 + 7)).retval == -1
        assert bpfsys.test_run(clf.fd("egress"), frame(7, 1024 + 7, RESPONSE)).retval == -1
    finally:
        os.sched_setaffinity(0, original)


def later_packet_mirrored(clf) -> bool:
    before = clf.counters()["mirrored_packets"]
    ack = frame(7, 1024 + 7, b"", from_server=False)
    assert bpfsys.test_run(clf.fd("ingress"), ack).retval == -1
    return clf.counters()["mirrored_packets"] == before + 1


def test_idle_flow_expires_fresh_one_stays(clf):
    clf.set_idle_timeout(60)
    mark(clf)
    assert clf.flows()[KEY]["status"] == 500
    assert clf.expire_idle(time.monotonic_ns(), 60 * 10**9) == 0
    assert KEY in clf.flows()
    # Seen idle by a sweep: counted, and counted once.
    assert clf.expire_idle(time.monotonic_ns() + 61 * 10**9, 60 * 10**9) == 1
    assert clf.expire_idle(time.monotonic_ns() + 62 * 10**9, 60 * 10**9) == 0
    assert clf.flows(time.monotonic_ns() + 61 * 10**9) == {}


def test_the_classifier_unmarks_an_idle_flow_at_its_next_packet(clf):
    clf.set_idle_timeout(60)
    mark(clf)
    assert later_packet_mirrored(clf)
    clf.set_idle_timeout(1e-9)          # everything marked is idle now
    assert KEY not in clf.flows()
    next_coarse_tick()
    assert not later_packet_mirrored(clf)
    assert clf.counters()["flows_expired"] == 1
    clf.set_idle_timeout(60)
    assert KEY not in clf.flows()       # unmarked for good, not only hidden


def test_lookup_prefilter_follows_the_marks(clf):
    """Lookups of packets that only ask "marked?" are skipped only while none is."""
    clf.set_idle_timeout(60)
    assert clf.lookups_skipped()                    # clf starts with nothing marked
    mark(clf)
    assert not clf.lookups_skipped()
    assert not clf.note_if_empty()                  # one is marked: nothing published
    assert later_packet_mirrored(clf)
    clf.set_idle_timeout(1e-9)
    assert clf.note_if_empty() and clf.lookups_skipped()
    clf.set_idle_timeout(60)
    mark(clf)                                       # marked again: lookups resume
    assert not clf.lookups_skipped()
    assert later_packet_mirrored(clf)


def test_mark_racing_the_empty_scan_is_not_lost(clf, monkeypatch):
    """The race the generation scheme closes: note_if_empty reads the mark count and its
    scan finds nothing marked, the classifier marks a connection before it publishes the
    count it read. The classifier must keep looking up. The product's note_if_empty runs;
    only its scan is wrapped, so that the mark lands right after it."""
    scan = clf.flow_count

    def scan_then_mark(*args) -> int:
        found = scan(*args)
        mark(clf)                                   # the classifier marks meanwhile
        return found
    monkeypatch.setattr(clf, "flow_count", scan_then_mark)
    assert clf.note_if_empty()                      # the scan found none: published
    monkeypatch.undo()
    assert KEY in clf.flows()
    assert not clf.lookups_skipped()
    assert later_packet_mirrored(clf)
