"""The lab's interface names (mirror/lab/netns.py): unique within a test session however
long it runs."""
from __future__ import annotations

import itertools
import os

import pytest

from mirror.lab import netns

pytestmark = pytest.mark.kernel


def test_a_wrapped_name_whose_link_exists_is_skipped(monkeypatch):
    """After 256 names the sequence wraps; the name of a link that still exists (a
    session's debug interface, once) is not handed out again."""
    # A sequence of its own, about to wrap to f8: the session's names stay as they were.
    monkeypatch.setattr(netns, "_seq", itertools.count(0x1F8))
    pid = os.getpid()
    taken = f"m{pid:06x}f8z"
    netns.sh("ip", "link", "add", taken, "type", "veth", "peer", "name", f"{taken}-p")
    try:
        assert netns.unique_name("z") == f"m{pid:06x}f9z"
    finally:
        netns.sh("ip", "link", "del", taken, check=False)
    assert netns.unique_name("z") == f"m{pid:06x}faz"     # nothing skipped when free
