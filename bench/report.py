"""From raw runs to what an operator reads: medians over rounds, ratios to untraced,
targets met or not, a Markdown report.

Ratios are paired: each round's value divided by the untraced value of the same round
(configurations run back to back within a round, so slow drift of the machine cancels),
then the median over rounds. Medians of the raw values are reported next to them."""
from __future__ import annotations

import statistics
import time

BASE = "untraced"
CLSACT = "mirror-clsact"
THESIS = "thesis"

TARGETS = (
    ("http-0", "HTTP throughput at 0 % errors, mirror (clsact) / untraced", 0.98),
    ("http-100", "HTTP throughput at 100 % errors, mirror (clsact) / untraced", 0.97),
    ("iperf-off", "iperf3 throughput, offloads off, mirror (clsact) / untraced", 0.98),
)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _stat(by_round: dict, base_by_round: dict | None) -> dict:
    out = {"values": [by_round[r] for r in sorted(by_round)], "median": _median(by_round.values())}
    if base_by_round is not None:
        ratios = [by_round[r] / base_by_round[r] for r in sorted(by_round)
                  if r in base_by_round and base_by_round[r]]
        out["ratio"] = round(_median(ratios), 4) if ratios else None
        out["ratios"] = [round(x, 4) for x in ratios]
    return out


def _series(runs, config, metric, **match) -> dict:
    out = {}
    for r in runs:
        if r["config"] != config or any(r.get(k) != v for k, v in match.items()):
            continue
        v = metric(r)
        if v is not None:
            out[r["round"]] = v
    return out


HTTP_METRICS = {
    "req_per_s": lambda r: r["req_per_s"],
    "mean_us": lambda r: r["latency"].get("mean_us"),
    "p50_us": lambda r: r["latency"].get("p50_us"),
    "p90_us": lambda r: r["latency"].get("p90_us"),
    "p99_us": lambda r: r["latency"].get("p99_us"),
    "error_share": lambda r: r["error_share"],
}


def summarize(result: dict) -> dict:
    configs = [c["key"] for c in result["configs"]]
    kept = [r for r in result["runs"] if not r.get("discarded")]
    runs = [r for r in kept if "error" not in r]
    failed = [r for r in kept if "error" in r]
    iperf = {}
    for off in ("on", "off"):
        base = _series(runs, BASE, lambda r: r["bits_per_second"], workload="iperf3",
                       offloads=off)
        iperf[off] = {c: _stat(_series(runs, c, lambda r: r["bits_per_second"],
                                       workload="iperf3", offloads=off),
                               base if base else None) for c in configs}
    http = {}
    for pct in result["settings"]["error_levels"]:
        http[pct] = {}
        for c in configs:
            row = {}
            for name, fn in HTTP_METRICS.items():
                base = _series(runs, BASE, fn, workload="h2load", error_pct=pct)
                row[name] = _stat(_series(runs, c, fn, workload="h2load", error_pct=pct),
                                  base if base and name != "error_share" else None)
            row["completeness"] = _completeness(
                [r for r in runs if r["config"] == c and r["workload"] == "h2load"
                 and r["error_pct"] == pct])
            row["log2_hist"] = _sum_hists(
                [r["latency"].get("log2_hist") for r in runs if r["config"] == c
                 and r["workload"] == "h2load" and r["error_pct"] == pct])
            http[pct][c] = row
    summary = {"iperf3": iperf, "http": http, "failed_runs": len(failed),
               "in_traffic": _in_traffic(result.get("in_traffic", [])),
               "microbench": result.get("microbench", [])}
    summary["completeness"] = _completeness_verdict(result, http)
    summary["targets"] = targets(summary)
    return summary


def _completeness(runs: list[dict]) -> dict | None:
    comps = [r["completeness"] for r in runs if "completeness" in r]
    if not comps:
        return None
    keys = ("responses_5xx", "error_connections", "error_flows_mirrored", "ok_flows_mirrored",
            "mirrored_packets", "min_packets_expected")
    out = {k: sum(c[k] for c in comps) for k in keys}
    out["runs"] = len(comps)
    out["complete_runs"] = sum(c["complete"] for c in comps)
    out["complete"] = out["complete_runs"] == len(comps)
    out["problems"] = sorted({p for c in comps for p in c["problems"]})
    return out


def _completeness_verdict(result: dict, http: dict) -> dict:
    mirroring = [c["key"] for c in result["configs"] if c["mirrors"]]
    verdict = {}
    for c in mirroring:
        comps = [http[p][c]["completeness"] for p in http if http[p][c]["completeness"]]
        verdict[c] = bool(comps) and all(x["complete"] for x in comps)
    return verdict


def _sum_hists(hists: list) -> list[int] | None:
    hists = [h for h in hists if h]
    if not hists:
        return None
    return [sum(col) for col in zip(*hists)]


def _in_traffic(recs: list[dict]) -> dict:
    out = {}
    for r in recs:
        if "error" in r:
            continue
        out.setdefault(r["config"], {})[r["error_pct"]] = {
            k: r.get(k) for k in ("ns_per_run", "runs_per_request", "sink_ns_per_clone",
                                  "req_per_s")}
    return out


def targets(summary: dict) -> list[dict]:
    out = []
    comp = summary["completeness"]
    ok_baseline = comp.get(CLSACT, False) and comp.get(THESIS, False)
    out.append({
        "id": "completeness",
        "text": "every mirroring configuration mirrored every error connection and no "
                "success connection, in every h2load run",
        "measured": ", ".join(f"{k}: {'complete' if v else 'INCOMPLETE'}"
                              for k, v in comp.items()),
        "threshold": None, "met": all(comp.values()) if comp else False})
    for tid, text, threshold in TARGETS:
        if tid.startswith("http"):
            pct = 0 if tid == "http-0" else 100
            cell = summary["http"].get(pct, {}).get(CLSACT)
            stat = cell["req_per_s"] if cell else {}
        else:
            stat = summary["iperf3"]["off"].get(CLSACT, {})
        ratio = stat.get("ratio")
        out.append({"id": tid, "text": f"{text} >= {threshold:.0%}",
                    "measured": ratio, "per_round": stat.get("ratios", []),
                    "threshold": threshold,
                    "met": ratio is not None and ratio >= threshold and comp.get(CLSACT, False)})
    rows = [r for r in summary["microbench"] if THESIS in r["handled_by"]]
    worse = [(r["frame"], r["ns"]["mirror"] / r["ns"][THESIS]) for r in rows]
    worst = max(worse, key=lambda x: x[1]) if worse else (None, None)
    out.append({
        "id": "per-packet",
        "text": "mirror's per-packet cost below the thesis reproduction's on every frame "
                "class the thesis parses (IPv4), BPF_PROG_TEST_RUN",
        "measured": worst[1] and round(worst[1], 3), "worst_frame": worst[0],
        "slower_on": [f for f, x in worse if x >= 1], "threshold": 1.0,
        "met": bool(worse) and all(x < 1 for _, x in worse) and ok_baseline})
    for t in out:
        if t["id"] != "completeness" and not ok_baseline:
            t["note"] = ("not a fair comparison: the mirror or the thesis reproduction missed "
                         "error connections")
    return out


# --- Markdown ---------------------------------------------------------------------------

def _pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def _num(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x)


def markdown(result: dict, summary: dict, plots: dict[str, str]) -> str:
    st, m = result["settings"], result["machine"]
    labels = {c["key"]: c["label"] for c in result["configs"]}
    cfgs = [c["key"] for c in result["configs"]]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(result["started"]))
    mins = (result["finished"] - result["started"]) / 60
    L = [f"# mirror bench: {st['mode']} run of {when}", ""]
    L += [f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, Linux {m['kernel']}; load average "
          f"{' '.join(m['loadavg'])} before, {' '.join(m.get('loadavg_after', []))} after; "
          f"{mins:.0f} minutes. {m['h2load']}, {m['iperf3']}, {m['nginx']}. "
          f"Code: commit {m.get('git_commit', '?')}.",
          "",
          f"{st['rounds']} round(s), configurations interleaved within each workload "
          f"(A B C D E, A B C D E, ...); h2load {st['h2load_seconds']} s per run, iperf3 "
          f"{st['iperf_seconds']} s (+{st['iperf_omit']} s omitted). Clients pinned to CPU "
          f"{m['client_cpu']}, nginx (1 worker) and iperf3 -s to CPU {m['server_cpu']}. "
          "Numbers are medians over rounds; ratios are to untraced, paired round by round, "
          "from this one run: compare ratios, not absolute numbers, across machines.", ""]
    kept = [r for r in result["runs"] if not r.get("discarded")]
    foreign = sorted(r["foreign_cpu"] for r in kept if r.get("foreign_cpu") is not None)
    redone = sum(1 for r in result["runs"] if r.get("discarded"))
    if foreign:
        over = sum(1 for f in foreign if f > 0.05)
        L += [f"Other work on the machine (CPU time not the bench's, bench/noise.py), per "
              f"run: median {_pct(statistics.median(foreign), 0)}, max {_pct(foreign[-1], 0)}"
              f"; {over} of {len(foreign)} runs above 5 %"
              + (f"; {redone} runs discarded and their group run again because another "
                 f"tenant took more than {_pct(st['max_foreign'], 0)} of the CPUs"
                 if redone else "") + ".", ""]
    L += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in summary["targets"]:
        if t["id"] == "completeness":
            meas = t["measured"]
        elif t["id"] == "per-packet":
            meas = (f"worst mirror/thesis {t['measured']:.2f}x ({t['worst_frame']})"
                    if t["measured"] else "-")
        else:
            meas = _pct(t["measured"])
            if len(t.get("per_round", [])) > 1:
                meas += f" (rounds: {', '.join(_pct(x, 0) for x in t['per_round'])})"
        met = "met" if t["met"] else "**not met**"
        if t.get("note"):
            met += f" ({t['note']})"
        L.append(f"| {t['text']} | {meas} | {met} |")
    L += ["", "## HTTP throughput (h2load, requests/s)", ""]
    L += _http_table(summary, cfgs, labels, "req_per_s", "{:,.0f}")
    L += ["", "## Mean request latency (us)", ""]
    L += _http_table(summary, cfgs, labels, "mean_us", "{:,.0f}")
    L += ["", "## Latency percentiles (us, median over rounds)", "",
          "| errors | configuration | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for pct, row in summary["http"].items():
        for c in cfgs:
            cell = row[c]
            L.append(f"| {pct} % | {labels[c]} | " + " | ".join(
                _num(cell[k]["median"]) for k in ("p50_us", "p90_us", "p99_us")) + " |")
    L += ["", "## iperf3 TCP throughput (Gbit/s)", "",
          "| offloads | " + " | ".join(labels[c] for c in cfgs) + " |",
          "|---" * (len(cfgs) + 1) + "|"]
    for off, row in summary["iperf3"].items():
        L.append(f"| {off} | " + " | ".join(
            f"{_num(row[c]['median'] and row[c]['median'] / 1e9, '{:.2f}')} "
            f"({_pct(row[c].get('ratio'))})" for c in cfgs) + " |")
    L += ["", "## Mirror completeness during the h2load runs (all rounds summed)", "",
          "| errors | configuration | 5xx responses | error connections mirrored | "
          "success connections mirrored | packets mirrored (expected at least) | complete |",
          "|---|---|---|---|---|---|---|"]
    for pct, row in summary["http"].items():
        for c in cfgs:
            comp = row[c]["completeness"]
            if not comp:
                continue
            L.append(f"| {pct} % | {labels[c]} | {comp['responses_5xx']:,} | "
                     f"{comp['error_flows_mirrored']}/{comp['error_connections']} | "
                     f"{comp['ok_flows_mirrored']} | {comp['mirrored_packets']:,} "
                     f"({comp['min_packets_expected']:,}) | "
                     f"{'yes' if comp['complete'] else 'NO: ' + '; '.join(comp['problems'])} |")
    L += per_packet_section(summary["microbench"], st["micro_rounds"])
    L += ["", "## In-traffic cost (program run-time statistics during h2load runs)", "",
          "ns per invocation of the classifier(s), invocations per request, and the debug "
          "sink's ns per clone. For the thesis the clone happens in act_mirred, outside its "
          "program; for the mirror bpf_clone_redirect runs inside it.", "",
          "| errors | " + " | ".join(labels[c] for c in summary["in_traffic"]) + " |",
          "|---" * (len(summary["in_traffic"]) + 1) + "|"]
    levels = sorted({p for v in summary["in_traffic"].values() for p in v})
    for pct in levels:
        cells = []
        for c, per in summary["in_traffic"].items():
            v = per.get(pct)
            if not v or v["ns_per_run"] is None:
                cells.append("-")
                continue
            text = f"{v['ns_per_run']:.0f} ns x {v['runs_per_request']:.2f}/req"
            if v.get("sink_ns_per_clone"):
                text += f", sink {v['sink_ns_per_clone']:.0f} ns/clone"
            cells.append(text)
        L.append(f"| {pct} % | " + " | ".join(cells) + " |")
    if plots:
        L += ["", "## Plots", ""]
        L += [f"![{name}]({path})" for name, path in plots.items()]
    if summary["failed_runs"]:
        L += ["", f"{summary['failed_runs']} run(s) failed; see `runs` in the JSON."]
    return "\n".join(L) + "\n"


PER_PACKET_SUBJECTS = ("thesis", "mirror", "mirror+clone")

PER_PACKET_LIMITS = (
    "Limits of these numbers. *Linear frames*: BPF_PROG_TEST_RUN puts the whole frame in "
    "the skb's linear area, where a real socket's skb carries its payload in page "
    "fragments, so the status line and request reads (bpf_skb_load_bytes) copy from "
    "memory at hand here and walk fragments in traffic. *Hot caches*: each row runs one "
    "frame over and over, so the frame, the map bucket it hashes to and the program stay "
    "in the CPU's caches; in traffic a lookup in a large map mostly misses them. *One "
    "flow in the map*: the maps hold the measured flow and at most one other, except in "
    "the rows marked \"maps 90 % full\" (below). *No act_mirred for the thesis*: its "
    "clone is an action that runs after its program, which BPF_PROG_TEST_RUN never runs, "
    "so on a marked flow the thesis column lacks the clone the `mirror+clone` column "
    "includes: compare it with `mirror`. The in-traffic cost below has none of these "
    "limits (and none of this table's precision).")


def per_packet_section(rows: list[dict], rounds) -> list[str]:
    """The per-packet section of the report: every frame class, then the large-map rows
    next to their one-flow counterparts."""
    L = ["", "## Per-packet cost (BPF_PROG_TEST_RUN, ns per packet, median of "
         f"{rounds} rounds; x = ratio to the empty classifier)", "",
         "`mirror` decides only (its clone is off, as the thesis's clone is an act_mirred "
         "action that BPF_PROG_TEST_RUN never runs); `mirror+clone` includes "
         "bpf_clone_redirect to a debug veth. The thesis program does not parse IPv6 "
         "(it passes such frames at the EtherType check).", "", PER_PACKET_LIMITS, "",
         "| frame | empty | thesis | mirror | mirror+clone | mirror / thesis |",
         "|---|---|---|---|---|---|"]
    for r in rows:
        ns, x = r["ns"], r["ratio_to_empty"]
        vs = (f"{ns['mirror'] / ns['thesis']:.2f}" if "thesis" in r["handled_by"]
              else "(not parsed)")
        L.append(f"| {r['frame']}{' (single runs)' if r['method'] == 'single' else ''} | "
                 f"{ns['empty']:.0f} | {ns['thesis']:.0f} ({x['thesis']:.1f}x) | "
                 f"{ns['mirror']:.0f} ({x['mirror']:.1f}x) | "
                 f"{ns['mirror+clone']:.0f} ({x['mirror+clone']:.1f}x) | {vs} |")
    return L + _large_map_table(rows)


def _large_map_table(rows: list[dict]) -> list[str]:
    """Each large-map row against the same packet with one other flow marked."""
    by_frame = {r["frame"]: r for r in rows}
    pairs = [(r, by_frame.get(r["large_map"]["one_flow"])) for r in rows
             if r.get("large_map")]
    pairs = [(big, one) for big, one in pairs if one]
    if not pairs:
        return []
    held = pairs[0][0]["large_map"]["entries"]
    mirror, thesis = held.get("mirror", {}), held.get("thesis", {})
    L = ["", "### With the maps 90 % full", "",
         f"The same packets with the mirror's flow map holding {_num(mirror.get('flows'))} "
         f"other flows and its request map {_num(mirror.get('requests'))} requests, and "
         f"the thesis's connection map {_num(thesis.get('connections'))} connections "
         "(the fewest any round held), against the rows with one other flow marked: a "
         "lookup that misses, the insert that marks a flow, a lookup that hits. The "
         "caches stay hot, so this is the cost of fuller buckets and of LRU bookkeeping, "
         "not of the cache misses a large map adds in traffic.", "",
         "| frame | " + " | ".join(f"{s}: one flow -> 90 % full" for s in
                                   PER_PACKET_SUBJECTS) + " |",
         "|---" * (len(PER_PACKET_SUBJECTS) + 1) + "|"]
    for big, one in pairs:
        cells = []
        for s in PER_PACKET_SUBJECTS:
            a, b = one["ns"].get(s), big["ns"].get(s)
            if s == "thesis" and "thesis" not in big["handled_by"]:
                cells.append("(not parsed)")
            elif a and b:
                cells.append(f"{a:.0f} -> {b:.0f} ({b / a - 1:+.0%})")
            else:
                cells.append("-")
        L.append(f"| {big['frame']} | " + " | ".join(cells) + " |")
    return L


def _http_table(summary, cfgs, labels, metric, fmt) -> list[str]:
    out = ["| errors (measured 5xx share) | " + " | ".join(labels[c] for c in cfgs) + " |",
           "|---" * (len(cfgs) + 1) + "|"]
    for pct, row in summary["http"].items():
        cells = []
        for c in cfgs:
            s = row[c][metric]
            text = _num(s["median"], fmt)
            if c != BASE and s.get("ratio") is not None:
                text += f" ({_pct(s['ratio'])})"
            cells.append(text)
        shares = [row[c]["error_share"]["median"] for c in cfgs
                  if row[c]["error_share"]["median"] is not None]
        measured = f" ({_pct(statistics.median(shares))})" if shares and 0 < pct < 100 else ""
        out.append(f"| {pct} %{measured} | " + " | ".join(cells) + " |")
    return out


def print_targets(summary: dict) -> None:
    print("\nTargets:")
    for t in summary["targets"]:
        if t["id"] == "per-packet":
            meas = (f"worst mirror/thesis {t['measured']:.2f}x on {t['worst_frame']}"
                    if t["measured"] else "-")
        elif t["id"] == "completeness":
            meas = t["measured"]
        else:
            meas = _pct(t["measured"])
        print(f"  {'MET    ' if t['met'] else 'NOT MET'}  {t['text']}: {meas}"
              + (f" [{t['note']}]" if t.get("note") else ""))
