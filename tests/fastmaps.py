"""Raw bpf(2) calls for the differential fuzz (tests/test_fuzz.py), where bcc's per-call
overhead would dominate: one BPF_PROG_TEST_RUN with preallocated buffers (and a struct
__sk_buff context, for the ingress_ifindex a packet arrived on), the whole per-CPU
counters array in a single BPF_MAP_LOOKUP_BATCH, and plain lookups, key walks and
deletes on hash and array maps (the connection slots, the kept requests).

Test code only: the product reads its maps through mirror/bpfprog.py. The syscall and the
bpf_attr layouts are mirror.bpfsys's."""
from __future__ import annotations

import ctypes
import errno
import os
import struct

from mirror.bpfsys import (BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_MAP_LOOKUP_BATCH,
                           BPF_MAP_LOOKUP_ELEM, BPF_PROG_TEST_RUN, BatchAttr, ElemAttr,
                           TestRunAttr, call, possible_cpus)

# Largest frame this kernel's BPF_PROG_TEST_RUN accepts for a tc program: one page less
# the skb headroom (NET_SKB_PAD + NET_IP_ALIGN) and the tail room of skb_shared_info.
# Measured on this machine's kernel (6.18, 4 KiB pages) by bisection; frames built by the
# fuzz stay far below it, and tests/test_fuzz.py checks the limit itself.
TEST_RUN_MAX_FRAME = 3712
_BUF = 4096 + 256
# struct __sk_buff (include/uapi/linux/bpf.h) as BPF_PROG_TEST_RUN takes it in ctx_in:
# every field but a few (mark, priority, ingress_ifindex, ifindex, cb, tstamp, wire_len,
# gso_segs, gso_size, hwtstamp) must be zero, or the run is refused with EINVAL.
SKB_CTX_SIZE = 192
SKB_INGRESS_IFINDEX = 36
SKB_IFINDEX = 40
# The device the test run's skb is on: the kernel looks ctx->ifindex up only when it is
# over 1, and otherwise runs on the namespace's loopback device, whose ifindex is 1.
TEST_RUN_IFINDEX = 1


class TestRunner:
    """BPF_PROG_TEST_RUN of one tc program with buffers allocated once. `run()` goes
    straight to the kernel (no 14-byte check in user space), so what the kernel refuses
    is seen as the kernel's errno. Every run passes a struct __sk_buff context on the
    loopback device (TEST_RUN_IFINDEX) that sets skb->ingress_ifindex (0: a packet this
    host sent, not one it received)."""

    __test__ = False  # not a pytest class

    def __init__(self, prog_fd: int):
        self._in = ctypes.create_string_buffer(_BUF)
        self._out = ctypes.create_string_buffer(_BUF)
        self._ctx = ctypes.create_string_buffer(SKB_CTX_SIZE)
        struct.pack_into("=I", self._ctx, SKB_IFINDEX, TEST_RUN_IFINDEX)
        self._ingress_ifindex = 0
        self._attr = TestRunAttr(prog_fd=prog_fd, data_in=ctypes.addressof(self._in),
                                  data_out=ctypes.addressof(self._out), repeat=1,
                                  ctx_in=ctypes.addressof(self._ctx),
                                  ctx_size_in=SKB_CTX_SIZE)

    def run(self, frame: bytes, ingress_ifindex: int = 0) -> tuple[int, int | None, bytes]:
        """(errno, retval, data_out): errno 0 when the program ran, else retval None."""
        n = len(frame)
        if n > _BUF:
            return errno.EINVAL, None, b""
        ctypes.memmove(self._in, frame, n)
        if ingress_ifindex != self._ingress_ifindex:
            struct.pack_into("=I", self._ctx, SKB_INGRESS_IFINDEX, ingress_ifindex)
            self._ingress_ifindex = ingress_ifindex
        a = self._attr
        a.data_size_in = n
        a.data_size_out = _BUF
        a.retval = 0
        ret = call(BPF_PROG_TEST_RUN, a)
        if ret < 0:
            return -ret, None, b""
        return 0, ctypes.c_int32(a.retval).value, self._out.raw[:a.data_size_out]


class PerCpuArray:
    """A BPF_MAP_TYPE_PERCPU_ARRAY of u64 read whole with one BPF_MAP_LOOKUP_BATCH."""

    def __init__(self, map_fd: int, entries: int):
        self.entries = entries
        self.ncpus = possible_cpus()
        self._keys = (ctypes.c_uint32 * entries)()
        self._values = (ctypes.c_uint64 * (entries * self.ncpus))()
        self._out_batch = ctypes.c_uint32()
        self._attr = BatchAttr(map_fd=map_fd, keys=ctypes.addressof(self._keys),
                                values=ctypes.addressof(self._values),
                                out_batch=ctypes.addressof(self._out_batch))
        self._unpack = struct.Struct(f"={entries * self.ncpus}Q").unpack_from

    def raw(self) -> bytes:
        """The values of every entry on every CPU, entry-major, as the kernel copied them."""
        self._attr.in_batch = 0
        self._attr.count = self.entries
        ret = call(BPF_MAP_LOOKUP_BATCH, self._attr)
        if ret < 0 and ret != -errno.ENOENT:
            raise OSError(-ret, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(-ret)}")
        if self._attr.count != self.entries:
            raise OSError(errno.EIO, f"BPF_MAP_LOOKUP_BATCH returned {self._attr.count} of "
                                     f"{self.entries} entries")
        return bytes(self._values)

    def sums(self, raw: bytes | None = None) -> list[int]:
        """Each entry summed over the CPUs (what user space reports)."""
        vals = self._unpack(self.raw() if raw is None else raw)
        n = self.ncpus
        return [sum(vals[i * n:(i + 1) * n]) for i in range(self.entries)]


class Hash:
    """Lookups, key walks and deletes on a hash map by raw key bytes (lookups work on an
    array map too, its key a little-endian u32 index: see slot_key)."""

    def __init__(self, map_fd: int, key_size: int, value_size: int, percpu: bool):
        self.map_fd = map_fd
        self.key_size = key_size
        slot = (value_size + 7) // 8 * 8
        self.value_len = slot * possible_cpus() if percpu else value_size
        self._key = ctypes.create_string_buffer(key_size)
        self._next = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(self.value_len)
        self._attr = ElemAttr(map_fd=map_fd, key=ctypes.addressof(self._key),
                                  value=ctypes.addressof(self._value))

    def lookup(self, key: bytes) -> bytes | None:
        ctypes.memmove(self._key, key, self.key_size)
        self._attr.key = ctypes.addressof(self._key)
        self._attr.value = ctypes.addressof(self._value)
        ret = call(BPF_MAP_LOOKUP_ELEM, self._attr)
        if ret == -errno.ENOENT:
            return None
        if ret < 0:
            raise OSError(-ret, f"BPF_MAP_LOOKUP_ELEM: {os.strerror(-ret)}")
        return self._value.raw

    def contains(self, key: bytes) -> bool:
        return self.lookup(key) is not None

    def keys(self) -> list[bytes]:
        out = []
        attr = ElemAttr(map_fd=self.map_fd, key=0, value=ctypes.addressof(self._next))
        while True:
            ret = call(BPF_MAP_GET_NEXT_KEY, attr)
            if ret == -errno.ENOENT:
                return out
            if ret < 0:
                raise OSError(-ret, f"BPF_MAP_GET_NEXT_KEY: {os.strerror(-ret)}")
            out.append(self._next.raw)
            ctypes.memmove(self._key, self._next, self.key_size)
            attr.key = ctypes.addressof(self._key)

    def delete(self, key: bytes) -> bool:
        ctypes.memmove(self._key, key, self.key_size)
        attr = ElemAttr(map_fd=self.map_fd, key=ctypes.addressof(self._key))
        ret = call(BPF_MAP_DELETE_ELEM, attr)
        if ret == -errno.ENOENT:
            return False
        if ret < 0:
            raise OSError(-ret, f"BPF_MAP_DELETE_ELEM: {os.strerror(-ret)}")
        return True


def slot_key(index: int) -> bytes:
    """An array map's key: the index as a native (little-endian) u32."""
    return index.to_bytes(4, "little")
