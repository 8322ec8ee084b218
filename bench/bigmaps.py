"""Other flows for the per-packet microbenchmark's large-map rows: fills a BPF hash map
with synthetic entries, in one BPF_MAP_UPDATE_BATCH, and removes exactly those again.

A host under load keeps many flows in the mirror's maps (marked error connections in
`flows`, the last request of each connection in `requests`) and many connections in the
thesis's LRU map. The large-map rows time the same packets with the maps that full: a
lookup walks a bucket that other flows share, an insert into an LRU map near its size
may evict. The filler flows are IPv4 connections between 198.19.0.0/16 clients
and one server, none of them the measured flow (bench/frames.py uses 198.18.0.1/2)."""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import struct
import time
from typing import Callable

from mirror.abi import FLOW_KEY, FLOW_VALUE
# Hash maps of every kind implement both batch commands (kernel/bpf/hashtab.c,
# generic_map_update_batch and generic_map_delete_batch).
from mirror.bpfsys import (BPF_MAP_DELETE_BATCH, BPF_MAP_UPDATE_BATCH, BatchAttr, batch_lookup,
                           call, possible_cpus)

FILL_SHARE = 0.9        # of each map's max_entries
SERVER = "198.18.0.2"
SERVER_PORT = 80


def filler_endpoints(count: int) -> list[tuple[int, int]]:
    """`count` distinct client endpoints: (IPv4 address in 198.19.0.0/16 as an int, port
    from 1024 up)."""
    base = int(ipaddress.ip_address("198.19.0.0"))
    return [(base + i % 65536, 1024 + i // 65536 * 64 + i % 64) for i in range(count)]


def mirror_keys(count: int) -> bytes:
    """struct flow_key of `count` filler connections, back to back. Packed here rather
    than with FlowKey (ten times slower for 60,000 keys): the server, 198.18.0.2, sorts
    below every 198.19 client, so it is always the key's lo endpoint."""
    layout = FLOW_KEY.struct
    server = ipaddress.ip_address(SERVER).packed.ljust(16, b"\0")
    return b"".join(layout.pack(server, addr.to_bytes(4, "big").ljust(16, b"\0"),
                                SERVER_PORT, port, 4)
                    for addr, port in filler_endpoints(count))


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


def marked_flow_value() -> bytes:
    """The per-CPU value of a flow marked just now by a 500 on CPU 0 (the other CPUs'
    slots zero, as they are until a CPU sees the flow)."""
    # The classifier stamps CLOCK_MONOTONIC_COARSE, which Python does not name: the
    # fine clock is within a tick of it.
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    slot = FLOW_VALUE.struct.pack(1, 200, now, now, 1, 500, 0)
    return slot + bytes(FLOW_VALUE.size * (possible_cpus() - 1))


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


def mirror_fillers(classifier, share: float = FILL_SHARE) -> dict[str, Filler]:
    """Fillers for the classifier's flows map and its requests map, `share` of each."""
    flows = classifier.bpf.get_table(b"flows")
    requests = classifier.bpf.get_table(b"requests")
    n_flows = int(classifier.max_flows * share)
    n_req = int(classifier.max_requests * share)
    req_value = bytes(ctypes.sizeof(requests.Leaf))
    return {"flows": Filler(flows.map_fd, FLOW_KEY.size, mirror_keys(n_flows),
                            marked_flow_value()),
            "requests": Filler(requests.map_fd, FLOW_KEY.size, mirror_keys(n_req), req_value)}


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


def mirror_maps(classifier, share: float = FILL_SHARE) -> MapSet:
    return MapSet(lambda: mirror_fillers(classifier, share))


def thesis_maps(thesis, share: float = FILL_SHARE) -> MapSet:
    return MapSet(lambda: {"connections": thesis_filler(thesis, share)})
