"""Idle expiry against the real map: the sweep deletes idle flows and puts back one that
a packet refreshed between the sweep's scan and its delete."""
from __future__ import annotations

import os
import time

import pytest

from test_flood import RESPONSE, frame
from mirror import bpfsys
from mirror.flowkey import FlowKey

pytestmark = pytest.mark.testrun

KEY = FlowKey.from_endpoints("198.18.0.1", 80, "198.19.0.7", 1024 + 7)


def mark(clf) -> None:
    original = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(original)})
    try:
        assert bpfsys.test_run(clf.fd("egress"), frame(7, 1024 + 7, RESPONSE)).retval == -1
    finally:
        os.sched_setaffinity(0, original)


def test_idle_flow_expires_fresh_one_stays(clf):
    mark(clf)
    before = clf.flows()[KEY]
    assert clf.expire_idle(time.monotonic_ns(), 60 * 10**9) == 0
    assert KEY in clf.flows()
    assert clf.expire_idle(time.monotonic_ns() + 61 * 10**9, 60 * 10**9) == 1
    assert KEY not in clf.flows()
    assert before["status"] == 500


def test_flow_refreshed_after_scan_is_put_back(clf):
    """_expire_one is the delete step: called for a key the scan found idle but whose
    value (read atomically with the delete) is fresh, it restores the flow unchanged."""
    mark(clf)
    before = clf.flows()[KEY]
    assert clf._expire_one(KEY.to_bytes(), time.monotonic_ns(), 60 * 10**9) == 0
    assert clf.flows()[KEY] == before
    assert clf._expire_one(KEY.to_bytes(), time.monotonic_ns() + 61 * 10**9, 60 * 10**9) == 1
    assert KEY not in clf.flows()
    assert clf._expire_one(KEY.to_bytes(), time.monotonic_ns(), 60 * 10**9) == 0   # gone


def later_packet_mirrored(clf) -> bool:
    before = clf.counters()["mirrored_packets"]
    ack = frame(7, 1024 + 7, b"", from_server=False)
    assert bpfsys.test_run(clf.fd("ingress"), ack).retval == -1
    return clf.counters()["mirrored_packets"] == before + 1


def test_lookup_prefilter_follows_the_map(clf):
    """Flow lookups are skipped only while the map is known empty."""
    assert clf.lookups_skipped()                    # clf starts with an empty map
    mark(clf)
    assert not clf.lookups_skipped()
    assert not clf.note_if_empty()                  # not empty: nothing published
    assert later_packet_mirrored(clf)
    assert clf.expire_idle(time.monotonic_ns() + 61 * 10**9, 60 * 10**9) == 1
    assert clf.note_if_empty() and clf.lookups_skipped()
    mark(clf)                                       # marked again: lookups resume
    assert not clf.lookups_skipped()
    assert later_packet_mirrored(clf)


def test_mark_racing_the_empty_scan_is_not_lost(clf, monkeypatch):
    """The race the generation scheme closes: note_if_empty reads the mark count and its
    scan finds the map empty, the classifier marks a flow before it publishes the count
    it read. The classifier must keep looking flows up. The product's note_if_empty runs;
    only its scan is wrapped, so that the mark lands right after it."""
    scan = clf.flow_count

    def scan_then_mark() -> int:
        found = scan()
        mark(clf)                                   # the classifier marks meanwhile
        return found
    monkeypatch.setattr(clf, "flow_count", scan_then_mark)
    assert clf.note_if_empty()                      # the scan found it empty: published
    monkeypatch.undo()
    assert KEY in clf.flows()
    assert not clf.lookups_skipped()
    assert later_packet_mirrored(clf)
