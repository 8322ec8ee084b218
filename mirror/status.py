"""`mirror status`: what is attached where, by live or stale controllers, read from the
ownership records and the kernel, and the workload behind each interface, asked of the
container runtimes once (mirror.workload: each runtime's call bounded by its timeout)."""
from __future__ import annotations

from pyroute2 import IPRoute

from . import hooks, ownership
from .cliutil import printable, table
from .workload import Workload, resolve


def collect() -> dict:
    ipr = IPRoute()
    try:
        links = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
        ifaces = []
        indexes = []            # the ifindex of each entry of ifaces, None when gone
        recorded = set()
        for rec in ownership.records("iface"):
            present = rec["ifindex"] in links
            name = links.get(rec["ifindex"], rec["ifname"])     # the current name
            recorded.add(name)
            live = ownership.is_held(ownership.iface_lock_name(rec["ifindex"]))
            found = hooks.ours(ipr, rec["ifindex"]) if present else []
            ifaces.append({"iface": name, "hook": rec["hook"], "pid": rec.get("pid"),
                           "owner": "live" if live else "stale",
                           "present": present, "qdiscs_created": rec["created"],
                           "filters": found})
            indexes.append(rec["ifindex"] if present else None)
        for idx, name in sorted(links.items()):
            if name in recorded:
                continue
            found = hooks.ours(ipr, idx)
            if found:
                ifaces.append({"iface": name, "hook": "?", "pid": None, "owner": "unrecorded",
                               "present": True, "qdiscs_created": [], "filters": found})
                indexes.append(idx)
        failures = _add_workloads(ifaces, indexes)
        live = {rec["id"] for rec in ownership.live_controllers()}
        controllers = [dict(rec, live=rec.get("id") in live)
                       for rec in ownership.records("controller")]
        return {"interfaces": ifaces, "controllers": controllers,
                "debug_ifaces": ownership.records("debug"), "workload_failures": failures}
    finally:
        ipr.close()


def _add_workloads(ifaces: list[dict], indexes: list[int | None]) -> dict:
    """Sets each present interface's "workload" (OpenTelemetry attribute names,
    mirror.workload); returns runtime -> {reason, detail} of the runtimes that failed."""
    present = [i for i in indexes if i is not None]
    answers, failures = resolve(present) if present else ({}, {})
    for entry, ifindex in zip(ifaces, indexes):
        answer = answers.get(ifindex) if ifindex is not None else None
        entry["workload"] = answer.attributes() if answer is not None else None
    return {name: {"reason": exc.reason, "detail": exc.detail}
            for name, exc in sorted(failures.items())}


def has_stale_hooks(report: dict) -> bool:
    """Whether hooks of this tool are in the kernel with no running controller behind
    them (a controller was killed: they go on mirroring until `mirror detach` or the
    next `mirror run` on the interface)."""
    return any(i["owner"] != "live" and i["present"] and i["filters"]
               for i in report["interfaces"])


def no_controller_note() -> str | None:
    """What `mirror flows` and `mirror events` say when no controller runs here (None
    when one does): not an error, a state, with what a stopped one left behind."""
    if ownership.live_controllers():
        return None
    stopped = ownership.stopped_controllers()
    note = "no running controller in this network namespace"
    if stopped:
        pids = ", ".join(str(c.get("pid")) for c in stopped)
        note += (f"; controller pid {pids} stopped without cleaning up (killed?): "
                 "`mirror status` shows what it left")
    return note


def render(report: dict) -> str:
    live = [c for c in report["controllers"] if c["live"]]
    stopped = [c for c in report["controllers"] if not c["live"]]
    if not report["interfaces"] and not report["controllers"]:
        return "no interface has mirror hooks in this network namespace"
    lines = []
    if report["interfaces"]:
        rows = [("IFACE", "WORKLOAD", "HOOK", "OWNER", "PID", "FILTERS", "QDISCS CREATED")]
        for i in report["interfaces"]:
            owner = i["owner"] + ("" if i["present"] else " (interface gone)")
            workload = Workload.from_attributes(i.get("workload"))
            rows.append((printable(i["iface"]), printable(workload.describe()) if workload
                         else "-", printable(i["hook"]), owner, str(i["pid"] or "-"),
                         ",".join(i["filters"]) or "-",
                         printable(",".join(map(str, i["qdiscs_created"]))) or "-"))
        lines = table(rows)
    for name, failure in report.get("workload_failures", {}).items():
        if failure["reason"] != "absent":       # a runtime not installed here is no news
            lines.append(f"workloads: {name} gave no answer ({failure['reason']}: "
                         f"{failure['detail']}); its containers are named by their network "
                         "namespace")
    for c in live:
        idle = c.get("idle_timeout")
        lines.append(f"controller pid {c['pid']}: running; trigger "
                     f"{printable(c.get('trigger'))}, debug iface "
                     f"{printable(c.get('debug_iface'))}, idle timeout "
                     f"{f'{idle:g}' if isinstance(idle, (int, float)) else '?'} s, metrics "
                     f"{printable(c.get('metrics_addr')) or 'off'}{_budgets(c)}")
        lines += _render_patterns(c)
    for c in stopped:
        lines.append(f"controller pid {c['pid']}: stopped without cleaning up (killed or "
                     "crashed)")
    if has_stale_hooks(report):
        lines.append("stale hooks: remove with `mirror detach --iface IF`, or start "
                     "`mirror run` again to replace them")
    elif not live:
        lines.append("no running controller, and no hook of this tool left in the kernel")
    return "\n".join(lines)


def _render_patterns(c: dict) -> list[str]:
    """The --iface patterns of a controller and the interfaces each one holds now."""
    if not isinstance(c.get("patterns"), list):
        return []
    matched = c.get("matched") if isinstance(c.get("matched"), dict) else {}
    lines = [f"  {printable(pat)}: "
             f"{printable(', '.join(map(str, matched.get(pat, [])))) or 'nothing yet'}"
             for pat in c["patterns"]]
    if c.get("exclude"):
        lines.append(f"  excluded: {printable(' '.join(map(str, c['exclude'])))}")
    lines.append(f"  at most {printable(c.get('max_ifaces'))} interfaces (--max-ifaces)")
    return lines


def _budgets(rec: dict) -> str:
    """The controller's budgets, as `mirror status` prints them (0: unlimited)."""
    if "max_packets_per_flow" not in rec:
        return ""

    def n(value, unit):
        return f"{value} {unit}" if value else f"unlimited {unit}"
    return (f", per flow {n(rec.get('max_packets_per_flow'), 'packets')} and "
            f"{n(rec.get('max_bytes_per_flow'), 'bytes')}, "
            f"{n(rec.get('max_clones_per_second'), 'clones/s')} per CPU")
