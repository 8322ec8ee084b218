"""`mirror status`: what is attached where, by live or stale controllers, read from the
ownership records and the kernel, and the workload behind each interface, asked of the
container runtimes once (mirror.workload: each runtime's call bounded by its timeout)."""
from __future__ import annotations

from pyroute2 import IPRoute

from . import hooks, ownership
from .cliutil import table
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
            ifaces.append({"iface": name, "hook": rec["hook"], "pid": rec["pid"],
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


def render(report: dict) -> str:
    live = [c for c in report["controllers"] if c["live"]]
    if not report["interfaces"] and not live:
        return "no interface has mirror hooks in this network namespace"
    lines = []
    if report["interfaces"]:
        rows = [("IFACE", "WORKLOAD", "HOOK", "OWNER", "PID", "FILTERS", "QDISCS CREATED")]
        for i in report["interfaces"]:
            owner = i["owner"] + ("" if i["present"] else " (interface gone)")
            workload = Workload.from_attributes(i.get("workload"))
            rows.append((i["iface"], workload.describe() if workload else "-", i["hook"],
                         owner, str(i["pid"] or "-"), ",".join(i["filters"]) or "-",
                         ",".join(i["qdiscs_created"]) or "-"))
        lines = table(rows)
    for name, failure in report.get("workload_failures", {}).items():
        if failure["reason"] != "absent":       # a runtime not installed here is no news
            lines.append(f"workloads: {name} gave no answer ({failure['reason']}: "
                         f"{failure['detail']}); its containers are named by their network "
                         "namespace")
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
