"""`mirror status`, `mirror flows` and `mirror detach`: read the ownership records and
the kernel, and talk to live controllers over their control sockets."""
from __future__ import annotations

import sys

from pyroute2 import IPRoute

from . import ownership, tc, tcx
from .control import ask
from .ownership import detach_record, detach_unrecorded
from .errors import UsageError
from .flowkey import endpoint

PROG_NAMES = ("mirror_ingress", "mirror_egress")


def collect() -> dict:
    ipr = IPRoute()
    try:
        links = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
        ifaces = []
        recorded = set()
        for rec in ownership.records("iface"):
            present = rec["ifindex"] in links
            name = links.get(rec["ifindex"], rec["ifname"])     # the current name
            recorded.add(name)
            live = ownership.is_held(ownership.iface_lock_name(rec["ifindex"]))
            hooks = _hooks_of(ipr, rec["ifindex"]) if present else []
            ifaces.append({"iface": name, "hook": rec["hook"], "pid": rec["pid"],
                           "owner": "live" if live else "stale",
                           "present": present, "qdiscs_created": rec["created"],
                           "filters": hooks})
        for idx, name in sorted(links.items()):
            if name in recorded:
                continue
            hooks = _hooks_of(ipr, idx)
            if hooks:
                ifaces.append({"iface": name, "hook": "?", "pid": None, "owner": "unrecorded",
                               "present": True, "qdiscs_created": [], "filters": hooks})
        controllers = [dict(rec, live=_controller_live(rec))
                       for rec in ownership.records("controller")]
        return {"interfaces": ifaces, "controllers": controllers,
                "debug_ifaces": ownership.records("debug")}
    finally:
        ipr.close()


def _controller_live(rec: dict) -> bool:
    return "id" in rec and ownership.is_held(f"controller-{rec['id']}")


def _hooks_of(ipr, ifindex: int) -> list[str]:
    """This tool's hooks on an interface: tc filters by parent, tcx links by direction."""
    hooks = [tc.fmt_handle(f.parent) for f in tc.our_filters(ipr, ifindex)]
    names = set(PROG_NAMES)
    hooks += [f"tcx:{l.direction}" for l in tcx.links(ifindex) if l.prog_name in names]
    return hooks


def render(report: dict) -> str:
    live = [c for c in report["controllers"] if c["live"]]
    if not report["interfaces"] and not live:
        return "no interface has mirror hooks in this network namespace"
    lines = []
    if report["interfaces"]:
        rows = [("IFACE", "HOOK", "OWNER", "PID", "FILTERS", "QDISCS CREATED")]
        for i in report["interfaces"]:
            owner = i["owner"] + ("" if i["present"] else " (interface gone)")
            rows.append((i["iface"], i["hook"], owner, str(i["pid"] or "-"),
                         ",".join(i["filters"]) or "-", ",".join(i["qdiscs_created"]) or "-"))
        lines = _table(rows)
    for c in live:
        lines.append(f"controller pid {c['pid']}: trigger {c['trigger']}, debug iface "
                     f"{c['debug_iface']}, idle timeout {c['idle_timeout']:g} s, "
                     f"metrics {c['metrics_addr'] or 'off'}{_budgets(c)}")
        lines += _render_patterns(c)
    if any(i["owner"] != "live" for i in report["interfaces"]):
        lines.append("stale hooks: remove with `mirror detach --iface IF`, or start "
                     "`mirror run` again to replace them")
    return "\n".join(lines)


def _render_patterns(c: dict) -> list[str]:
    """The --iface patterns of a controller and the interfaces each one holds now."""
    if not c.get("patterns"):
        return []
    lines = [f"  {pat}: {', '.join(c['matched'].get(pat, [])) or 'nothing yet'}"
             for pat in c["patterns"]]
    if c.get("exclude"):
        lines.append(f"  excluded: {' '.join(c['exclude'])}")
    lines.append(f"  at most {c['max_ifaces']} interfaces (--max-ifaces)")
    return lines


def _budgets(rec: dict) -> str:
    """The controller's budgets, as `mirror status` prints them (0: unlimited)."""
    if "max_packets_per_flow" not in rec:
        return ""

    def n(value, unit):
        return f"{value} {unit}" if value else f"unlimited {unit}"
    return (f", per flow {n(rec['max_packets_per_flow'], 'packets')} and "
            f"{n(rec['max_bytes_per_flow'], 'bytes')}, "
            f"{n(rec['max_clones_per_second'], 'clones/s')} per CPU")


def _table(rows) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def collect_flows() -> list[dict]:
    flows = []
    for rec in ownership.records("controller"):
        if not _controller_live(rec):
            continue
        try:
            for f in ask(rec["socket"], "flows"):
                flows.append(dict(f, controller=rec["pid"]))
        except OSError as exc:
            print(f"mirror: controller {rec['pid']} did not answer: {exc}", file=sys.stderr)
    return flows


def render_flows(flows: list[dict]) -> str:
    if not flows:
        return "no marked flows"
    rows = [("FLOW", "STATUS", "PACKETS", "BYTES", "AGE s", "IDLE s", "CAPTURE")]
    for f in flows:
        flow = f"{endpoint(f['a'], f['a_port'])} <-> {endpoint(f['b'], f['b_port'])}"
        cut = f.get("cut") or []
        rows.append((flow, str(f["status"] or "-"),
                     str(f["packets"]), str(f["bytes"]), str(f["age_s"]), str(f["idle_s"]),
                     f"cut: {','.join(cut)}" if cut else "whole"))
    lines = _table(rows)
    cut = sum(1 for f in flows if f.get("cut"))
    if cut:
        lines.append(f"{cut} of {len(flows)} flows: capture cut by a budget (flow_packets, "
                     "flow_bytes: the rest of the connection skipped; cpu_rate: packets "
                     "skipped while a CPU's clones per second were spent)")
    return "\n".join(lines)


def detach(ifaces: list[str]) -> int:
    """Removes this tool's hooks from each interface, holding the interface's lock while
    it does, so that a controller starting meanwhile cannot attach under it (and one that
    holds it makes the command refuse)."""
    ipr = IPRoute()
    locks = []
    try:
        indexes = {}
        for name in ifaces:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise UsageError(f"unknown interface {name!r}: see `ip link`")
            lock = ownership.Lock(ownership.iface_lock_name(found[0]))
            if not lock.acquire():
                rec = ownership.read("iface", ownership.iface_key(found[0])) or {}
                raise UsageError(f"{name} is owned by a running controller (pid "
                                 f"{rec.get('pid', '?')}); stop it with SIGTERM instead")
            locks.append(lock)
            indexes[name] = found[0]
        for name, idx in indexes.items():
            rec = ownership.read("iface", ownership.iface_key(idx))
            done = detach_record(ipr, rec, idx) if rec else []
            done += detach_unrecorded(ipr, idx)
            ownership.remove("iface", ownership.iface_key(idx))
            print(f"{name}: " + (", ".join(f"removed {d}" if not d.startswith("kept") else d
                                            for d in done) or "no mirror hooks found"))
        return 0
    finally:
        for lock in locks:
            lock.release()      # its file goes when a controller prunes the state directory
        ipr.close()


def _live_controllers() -> list[dict]:
    return [rec for rec in ownership.records("controller") if _controller_live(rec)]


def render_event(e: dict) -> str:
    took = f"{e['response_ns'] / 1e6:.1f} ms" if e.get("response_ns") is not None else "-"
    request = f"{e['method']} {e['target']}" if e.get("method") else "(request not seen)"
    host = f" host {e['host']}" if e.get("host") else ""
    return (f"{e['time']}  {e['iface']}  {e['status']}  {request}{host}  {took}  "
            f"{e['client']} -> {e['server']}")


def follow_events(follow: bool, as_json: bool) -> int:
    """`mirror events`: prints the running controllers' recent events (and, with
    `follow`, new ones as they come, asking twice a second)."""
    import json
    import time
    seen: dict[str, int] = {}
    while True:
        controllers = _live_controllers()
        if not controllers and not follow:
            print("no running controller in this network namespace", file=sys.stderr)
            return 1
        batch = []
        for rec in controllers:
            try:
                got = ask(rec["socket"], f"events {seen.get(rec['id'], 0)}")
            except OSError as exc:
                print(f"mirror: controller {rec['pid']} did not answer: {exc}", file=sys.stderr)
                continue
            if got:
                seen[rec["id"]] = got[-1]["seq"]
            batch += got
        for e in sorted(batch, key=lambda e: e["time"]):
            e.pop("seq", None)
            print(json.dumps(e) if as_json else render_event(e), flush=True)
        if not follow:
            return 0
        time.sleep(0.5)
