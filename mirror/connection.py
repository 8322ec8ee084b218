"""One vocabulary for a connection and a moment, shared by every output that names them:
the error events, `mirror flows`, the capture index, the pcapng comments. An operator can
join any two of them on one string (the Community ID, which Zeek, Suricata, Elastic and
Wireshark print too) and filter any of them with the same jq.

  client, server   "198.18.0.1:40000", "[2001:db8::1]:80": who opened the connection
                   and who answered (None when the classifier never learned it: the
                   connection's start went unseen and no request since)
  endpoints        both, lower first, when client and server are unknown
  iface            the interface the mirror saw it on
  community_id     Community ID v1 of the flow (mirror.communityid)
  time, time_unix  RFC 3339 UTC with microseconds, and the same as seconds since the
                   epoch (jq's fromdateiso8601 takes no fractional seconds)
  *_seconds        every duration, in seconds
Workload fields, where known, are mirror.workload's attributes (OpenTelemetry names)."""
from __future__ import annotations

import time

from .communityid import of_flow
from .flowkey import FlowKey, endpoint


def conn_fields(key: FlowKey, client_lo: bool | None, iface: str | None = None) -> dict:
    """client, server (or endpoints), iface and community_id of a connection; `client_lo`:
    whether the client is the key's lo endpoint (None: not known)."""
    lo, hi = endpoint(key.addr_lo, key.port_lo), endpoint(key.addr_hi, key.port_hi)
    out: dict = {}
    if client_lo is None:
        out.update(client=None, server=None, endpoints=[lo, hi])
    else:
        out.update(client=lo if client_lo else hi, server=hi if client_lo else lo)
    out.update(iface=iface, community_id=of_flow(key))
    return out


_stamps: dict[int, str] = {}


def time_fields(epoch: float) -> dict:
    """time (RFC 3339 UTC, microseconds) and time_unix of a moment in seconds since the
    epoch. The second's text is kept from one call to the next: in an error storm every
    event of a second shares it."""
    whole = int(epoch)
    stamp = _stamps.get(whole)
    if stamp is None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _stamps.clear()
        _stamps[whole] = stamp
    micros = int(round((epoch - whole) * 1e6))
    if micros >= 1_000_000:             # rounding reached the next second
        return time_fields(whole + 1)
    return {"time": f"{stamp}.{micros:06d}Z", "time_unix": round(whole + micros / 1e6, 6)}
