"""Other connections for the per-packet microbenchmark's large-map rows.

A host under load keeps many connections in the mirror's state arrays (a state per
connection in `conns`, the last request of many in `requests`) and many in the thesis's
LRU map. The large-map rows time the same packets with those that full: a lookup meets
other connections' slots in its bucket, a new connection takes the slot of another, an
insert into an LRU map near its size may evict. The filler connections are IPv4
connections between 198.19.0.0/16 clients and one server, none of them the measured one
(bench/frames.py uses 198.18.0.1/2).

The thesis's map is filled with synthetic entries in one BPF_MAP_UPDATE_BATCH and emptied
of exactly those. The mirror's states are made the way the classifier makes them, by
running each filler connection's SYN and request through it (BPF_PROG_TEST_RUN), so that
each lands in the slot of its bucket the classifier chose; emptying them empties the
arrays."""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import struct
from typing import Callable

# Hash maps of every kind implement both batch commands (kernel/bpf/hashtab.c,
# generic_map_update_batch and generic_map_delete_batch).
from mirror.bpfsys import (BPF_MAP_DELETE_BATCH, BPF_MAP_UPDATE_BATCH, BatchAttr, batch_lookup,
                           call, test_run)

from . import frames

FILL_SHARE = 0.9        # of each map's max_entries
SERVER = "198.18.0.2"
SERVER_PORT = 80


def filler_endpoints(count: int) -> list[tuple[int, int]]:
    """`count` distinct client endpoints: (IPv4 address in 198.19.0.0/16 as an int, port
    from 1024 up)."""
    base = int(ipaddress.ip_address("198.19.0.0"))
    return [(base + i % 65536, 1024 + i // 65536 * 64 + i % 64) for i in range(count)]


def thesis_keys(count: int) -> bytes:
    """bench/bpf/thesis.c's struct connection_info of the filler connections as their
    500 responses carry them (server to client): addresses and ports in network byte
    order."""
    layout = struct.Struct("!4s4sHH")
    server = ipaddress.ip_address(SERVER).packed
    return b"".join(layout.pack(server, addr.to_bytes(4, "big"), SERVER_PORT, port)
                    for addr, port in filler_endpoints(count))


def filler_address(addr: int) -> str:
    return str(ipaddress.ip_address(addr))


class Filler:
    """`count` entries of one hash map, all with the same value, put in and taken out
    with one batch call each."""

    def __init__(self, map_fd: int, key_size: int, keys: bytes, value: bytes):
        self.map_fd, self.key_size = map_fd, key_size
        self.count = len(keys) // key_size
        self._keys = ctypes.create_string_buffer(keys, len(keys))
        self._values = ctypes.create_string_buffer(value * self.count, len(value) * self.count)
        self.value_size = len(value)
        self.filled = False

    def fill(self) -> None:
        if not self.filled:
            self._batch(BPF_MAP_UPDATE_BATCH, ctypes.addressof(self._values))
            self.filled = True

    def empty(self) -> None:
        if self.filled:
            # Entries an LRU map evicted meanwhile are not there to delete: one at a time
            # from the first missing key on, skipping those.
            self._batch(BPF_MAP_DELETE_BATCH, 0, missing_ok=True)
            self.filled = False

    def entries(self) -> int:
        """How many entries the map holds now, filler or not (BPF_MAP_LOOKUP_BATCH; a
        per-CPU map's value is already value_size times the possible CPUs here)."""
        return sum(n for _, _, n in batch_lookup(self.map_fd, self.key_size,
                                                 self.value_size, per_cpu=False))

    def _batch(self, cmd: int, values: int, missing_ok: bool = False) -> None:
        done = 0
        while done < self.count:
            attr = BatchAttr(keys=ctypes.addressof(self._keys) + done * self.key_size,
                             values=values + done * self.value_size if values else 0,
                             count=self.count - done, map_fd=self.map_fd)
            ret = call(cmd, attr)
            done += attr.count      # the kernel reports how many it processed
            if ret >= 0:
                return
            if missing_ok and ret == -errno.ENOENT:     # skip that one key
                done += 1
                continue
            raise OSError(-ret, f"bpf cmd {cmd} on map fd {self.map_fd}: {os.strerror(-ret)}"
                          f" after {done} of {self.count} entries")


class ConnFiller:
    """`share` of the classifier's connection slots taken by filler connections, each
    opened by its client's SYN and carrying a request (the classifier keeps it), through
    the egress entry point (the client's packets' hook in the bench's frames)."""

    def __init__(self, classifier, share: float, on_empty: Callable[[], None]):
        self.classifier = classifier
        self.count = int(classifier.conn_slots * share)
        self.on_empty = on_empty
        self.filled = False

    def _frames(self, addr: int, port: int) -> tuple[bytes, bytes]:
        return (frames.to_server_from(4, filler_address(addr), port, b"", frames.TCP_SYN),
                frames.to_server_from(4, filler_address(addr), port, frames.REQUEST))

    def fill(self) -> None:
        if self.filled:
            return
        fd = self.classifier.fd("egress")
        for addr, port in filler_endpoints(self.count):
            for frame in self._frames(addr, port):
                test_run(fd, frame, 1)
        self.filled = True

    def empty(self) -> None:
        if self.filled:
            self.classifier.clear()
            self.on_empty()
            self.filled = False

    def entries(self) -> int:
        return self.classifier.conn_count()


class RequestsHeld:
    """The kept requests the filler connections left (read only: ConnFiller fills and
    empties both arrays)."""

    def __init__(self, classifier):
        self.classifier = classifier

    def fill(self) -> None:
        pass

    def empty(self) -> None:
        pass

    def entries(self) -> int:
        return len(self.classifier.kept_requests())


def mirror_fillers(classifier, share: float = FILL_SHARE,
                   on_empty: Callable[[], None] = lambda: None) -> dict:
    """Fillers of the classifier's connection and request arrays; `on_empty()` runs after
    they are emptied (the microbenchmark opens its measured connections again)."""
    return {"conns": ConnFiller(classifier, share, on_empty),
            "requests": RequestsHeld(classifier)}


def thesis_filler(thesis, share: float = FILL_SHARE) -> Filler:
    n = int(thesis.max_connections * share)
    return Filler(thesis.connections.map_fd, 12, thesis_keys(n), struct.pack("=I", 1))


class MapSet:
    """The fillers of one program's maps, put in and taken out together; built at the
    first fill (making the keys takes a moment), idempotent after that."""

    def __init__(self, make: Callable[[], dict[str, Filler]]):
        self._make = make
        self._fillers: dict[str, Filler] | None = None
        self.held: dict[str, int] = {}

    def set(self, on: bool) -> dict[str, int]:
        """Fills (True) or empties (False) the maps; returns how many entries each map
        held right after it was filled ({} while empty)."""
        if on:
            if self._fillers is None:
                self._fillers = self._make()
            if not self.held:
                for f in self._fillers.values():
                    f.fill()
                self.held = {name: f.entries() for name, f in self._fillers.items()}
        elif self._fillers is not None:
            for f in self._fillers.values():
                f.empty()
            self.held = {}
        return self.held


def mirror_maps(classifier, share: float = FILL_SHARE,
                on_empty: Callable[[], None] = lambda: None) -> MapSet:
    return MapSet(lambda: mirror_fillers(classifier, share, on_empty))


def thesis_maps(thesis, share: float = FILL_SHARE) -> MapSet:
    return MapSet(lambda: {"connections": thesis_filler(thesis, share)})
