"""From raw runs to what an operator reads: per-configuration figures, ratios with 95 %
intervals (bench/stats.py), a verdict per target, a Markdown report; the same for the
scale mode (scale_summary, scale_markdown); and the one writer of result files (write),
for every mode.

Every ratio is paired by round: configuration A's value in round r over configuration B's
in the same round, then the mean over rounds with a bootstrap interval."""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from . import stats
from .configs import CANDIDATE
from .containers import ATTACH_MODES

BASE = "untraced"
CLSACT = "mirror-clsact"
THESIS = "thesis"
CONMON_ATTACH_MS, CONMON_MISSED = 79, 76       # ConMon (seed 002), at 1000 packets/s

COST_METRIC = {"h2load": ("cpu_us_per_request", "CPU-us per request"),
               "iperf3": ("cpu_s_per_gb", "CPU-s per GB")}


def _kept(result: dict, pass_: str) -> list[dict]:
    return [r for r in result["runs"] if r.get("pass") == pass_ and not r.get("discarded")
            and "error" not in r]


def _series(runs, workload, config, metric) -> dict:
    return {r["round"]: r[metric] for r in runs if r["workload"] == workload
            and r["config"] == config and r.get(metric) is not None}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def compare(runs, workload, a, b, metric) -> dict | None:
    """Mean of the per-round ratios a/b and its 95 % interval."""
    return stats.bootstrap_mean(stats.paired(_series(runs, workload, a, metric),
                                             _series(runs, workload, b, metric)))


def _metric(workload_id: str) -> str:
    return COST_METRIC["iperf3" if workload_id.startswith("iperf3") else "h2load"][0]


def _throughput(workload_id: str) -> str:
    return "bits_per_second" if workload_id.startswith("iperf3") else "req_per_s"


def _figure(pass_: str, workload_id: str) -> str:
    """The figure a pass compares configurations by: CPU per request (or per GB), the
    throughput at saturation, ns per invocation in traffic."""
    if pass_ == "cost":
        return _metric(workload_id)
    return _throughput(workload_id) if pass_ == "saturation" else "ns_per_run"


def summarize(result: dict) -> dict:
    plans = result.get("plans", {})
    cost_runs, sat_runs = _kept(result, "cost"), _kept(result, "saturation")
    it_runs = _kept(result, "in_traffic")
    summary = {"cost": {}, "saturation": {}, "in_traffic": {}, "clone_ns": {},
               "failed_runs": sum(1 for r in result["runs"] if "error" in r
                                  and not r.get("discarded")),
               "discarded_runs": sum(1 for r in result["runs"] if r.get("discarded")),
               "microbench": result.get("microbench", []),
               "attach": result.get("attach", {})}
    for wl, cfgs in plans.get("cost", []):
        metric = _figure("cost", wl)
        rows = {}
        for c in cfgs:
            s = _series(cost_runs, wl, c, metric)
            if not s:
                continue
            achieved = [r["req_per_s"] / r["offered_req_per_s"] for r in cost_runs
                        if r["workload"] == wl and r["config"] == c
                        and r.get("offered_req_per_s")]
            rows[c] = {"metric": metric, "median": _median(s.values()), "rounds": len(s),
                       "vs_untraced": compare(cost_runs, wl, c, BASE, metric)
                       if c != BASE else None,
                       "achieved_share": _median(achieved),
                       "softirq_share": _median([r.get("softirq_share") for r in cost_runs
                                                 if r["workload"] == wl and r["config"] == c])}
        summary["cost"][wl] = rows
    for wl, cfgs in plans.get("saturation", []):
        metric = _figure("saturation", wl)
        summary["saturation"][wl] = {
            c: {"median": _median(_series(sat_runs, wl, c, metric).values()),
                "vs_untraced": compare(sat_runs, wl, c, BASE, metric) if c != BASE else None}
            for c in cfgs if _series(sat_runs, wl, c, metric)}
    for wl, cfgs in plans.get("in_traffic", []):
        rows = {}
        for c in cfgs:
            s = _series(it_runs, wl, c, "ns_per_run")
            if not s:
                continue
            rows[c] = {"ns": stats.bootstrap_mean(list(s.values())),
                       "runs_per_request": _median(_series(it_runs, wl, c,
                                                           "runs_per_request").values()),
                       "sink_ns_per_clone": _median(_series(it_runs, wl, c,
                                                            "sink_ns_per_clone").values())}
        summary["in_traffic"][wl] = rows
        if "mirror-nobudget" in rows and "mirror-decide" in rows:
            a = _series(it_runs, wl, "mirror-nobudget", "ns_per_run")
            b = _series(it_runs, wl, "mirror-decide", "ns_per_run")
            summary["clone_ns"][wl] = stats.bootstrap_mean([a[r] - b[r] for r in a if r in b])
    summary["completeness"] = _completeness(result)
    summary["targets"] = targets(result, summary)
    return summary


def _completeness(result: dict) -> dict:
    """Per configuration, over every kept h2load run that judged it."""
    out = {}
    for r in result["runs"]:
        comp = r.get("completeness")
        if not comp or r.get("discarded"):
            continue
        agg = out.setdefault(r["config"], {"runs": 0, "complete_runs": 0, "responses_5xx": 0,
                                           "error_connections": 0, "error_flows_mirrored": 0,
                                           "ok_flows_mirrored": 0, "mirrored_packets": 0,
                                           "problems": set()})
        agg["runs"] += 1
        agg["complete_runs"] += comp["complete"]
        for k in ("responses_5xx", "error_connections", "error_flows_mirrored",
                  "ok_flows_mirrored", "mirrored_packets"):
            agg[k] += comp[k]
        agg["problems"] |= set(comp["problems"])
    for agg in out.values():
        agg["complete"] = agg["complete_runs"] == agg["runs"]
        agg["problems"] = sorted(agg["problems"])
    return out


def _target(tid, text, limit, ci, note="", at_least=False) -> dict:
    verdict = (stats.verdict_at_least(ci, limit) if at_least else
               stats.verdict_at_most(ci, limit))
    return {"id": tid, "text": text, "limit": limit, "ci": ci, "verdict": verdict,
            "note": note}


def _reported(tid, text, ci, note="") -> dict:
    """A figure the targets ask to see, with no limit of its own."""
    return {"id": tid, "text": text, "limit": None, "ci": ci,
            "verdict": "reported" if ci else "no data", "note": note}


def targets(result: dict, summary: dict) -> list[dict]:
    cost, it = _kept(result, "cost"), _kept(result, "in_traffic")
    comp = summary["completeness"]
    out = [{"id": "completeness",
            "text": "every mirroring configuration mirrored every error connection and no "
                    "success connection, in every h2load run that judged it",
            "limit": None, "ci": None,
            "verdict": ("met" if comp and all(v["complete"] for v in comp.values())
                        else "not met" if comp else "no data"),
            "note": ", ".join(f"{k} {v['complete_runs']}/{v['runs']}" for k, v in comp.items())}]
    metric = "cpu_us_per_request"
    out.append(_target("cpu-0", "CPU per request, HTTP/1.1 at 0 % errors: mirror (clsact, "
                       "snapshot on) / untraced, at most 1.02", 1.02,
                       compare(cost, "http1-0", CLSACT, BASE, metric)))
    out.append(_reported("cpu-0-floor", "the floor under it: an empty classifier on clsact "
                         "(the hook alone) / untraced",
                         compare(cost, "http1-0", "empty-clsact", BASE, metric)))
    out.append(_target("cpu-100", "CPU per request, HTTP/1.1 at 100 % errors: mirror "
                       "(clsact, default budgets) / thesis, at most 1", 1.0,
                       compare(cost, "http1-100", CLSACT, THESIS, metric)))
    out.append(_target("cpu-100-nobudget", "the same with no budgets (every packet cloned, "
                       "like the thesis): mirror / thesis, at most 1", 1.0,
                       compare(cost, "http1-100", "mirror-nobudget", THESIS, metric)))
    out.append(_reported("cpu-100-tcpdump", "the same for `tcpdump -w` of everything: "
                         "tcpdump -w / thesis",
                         compare(cost, "http1-100", "tcpdump-w", THESIS, metric)))
    sat = _kept(result, "saturation")
    rps = _throughput("http1-100")
    out.append(_target("sat-100", "saturation throughput, HTTP/1.1 at 100 % errors: mirror "
                       "(clsact, defaults) / thesis, at least 1", 1.0,
                       compare(sat, "http1-100", CLSACT, THESIS, rps), at_least=True))
    out.append(_reported("sat-100-tcpdump", "the same for `tcpdump -w` of everything: "
                         "tcpdump -w / thesis",
                         compare(sat, "http1-100", "tcpdump-w", THESIS, rps)))
    out.append(_reported("cpu-h2c-100", "CPU per request, h2c at 100 % errors: mirror "
                         "(clsact, defaults) / untraced (the thesis reads no h2c)",
                         compare(cost, "h2c-100", CLSACT, BASE, metric)))
    out.append(_target("ns-0", "in-traffic ns per invocation, HTTP/1.1 at 0 % errors: "
                       "mirror (clsact) / thesis, at most 1", 1.0,
                       compare(it, "http1-0", CLSACT, THESIS, "ns_per_run")))
    out.append(_target("ns-decide", "in-traffic ns per invocation, HTTP/1.1 at 100 % "
                       "errors, every connection marked, clone off (the decision path): "
                       "mirror / thesis, at most 2", 2.0,
                       compare(it, "http1-100", "mirror-decide", THESIS, "ns_per_run")))
    out.append(_reported("ns-decide-bounded", "the same with the mirror's default event "
                         "bounds (the decision path as shipped): mirror / thesis",
                         compare(it, "http1-100", "mirror-decide-bounded", THESIS,
                                 "ns_per_run")))
    out.append(_target("h2-parser", "in-traffic ns per invocation on HTTP/1.1 traffic "
                       "(0 % errors): HTTP/2 parser on / off, at most 1.10", 1.10,
                       compare(it, "http1-0", CLSACT, "mirror-noh2", "ns_per_run")))
    att = summary["attach"].get("clsact") or {}
    if "error" in att or not att:
        out.append({"id": "attach-p99", "text": "new interface attached within 10 ms (p99)",
                    "limit": 10.0, "ci": None, "verdict": "no data",
                    "note": att.get("error", "")})
    else:
        raw = att.get("attach_ms") or []
        ci = None
        if raw:
            p = stats.bootstrap_percentile(raw, 99)
            ci = {"mean": p["value"], "lo": p["lo"], "hi": p["hi"], "n": p["n"]}
        else:
            v = att.get("attach_ms_p99")
            ci = {"mean": v, "lo": v, "hi": v, "n": att.get("attached", 0)}
        out.append(_target("attach-p99", "new interface attached within 10 ms (p99, clsact; "
                           "ms)", 10.0, ci, "interval: bootstrap over interfaces"
                           if raw else "no per-interface figures: point value"))
        missed = att.get("packets_missed")
        out.append({"id": "attach-missed", "text": "0 packets missed at 1000 packets/s "
                    "(clsact)", "limit": 0, "ci": None,
                    "verdict": "met" if missed == 0 else "not met",
                    "note": f"{missed} of {att.get('packets_sent')} packets missed on "
                            f"{att.get('interfaces_with_misses')} of {att.get('interfaces')} "
                            "interfaces"})
    return out


# --- Markdown ---------------------------------------------------------------------------

def _pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def _num(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x)


def _ci(ci, fmt="{:.3f}") -> str:
    if not ci:
        return "-"
    return f"{fmt.format(ci['mean'])} [{fmt.format(ci['lo'])}, {fmt.format(ci['hi'])}]"


def run_title(result: dict) -> str:
    """'full run', 'quick run', or, when the run left passes or configurations out, which
    ones it had: a subset's targets say "no data" for what it skipped, and its title must
    not call it full."""
    mode, subset = result["settings"]["mode"], result.get("subset")
    cand = result.get("candidate")
    with_candidate = f" with a candidate classifier ({cand['dir']})" if cand else ""
    if not subset:
        return f"{mode} run{with_candidate}"
    return (f"partial run{with_candidate} ({mode} settings; passes: "
            f"{', '.join(subset['passes'])}; configurations: {', '.join(subset['configs'])})")


def markdown(result: dict, summary: dict, plots: dict[str, str]) -> str:
    st, m = result["settings"], result["machine"]
    labels = {c["key"]: c["label"] for c in result["configs"]}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(result["started"]))
    mins = (result["finished"] - result["started"]) / 60
    L = [f"# mirror bench: {run_title(result)} of {when}", ""]
    L += [f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, Linux {m['kernel']}; load average "
          f"{' '.join(m['loadavg'])} before, {' '.join(m.get('loadavg_after', []))} after; "
          f"{mins:.0f} minutes. {m['h2load']}, {m['iperf3']}, {m['nginx']}. "
          f"Code: commit {m.get('git_commit', '?')}.", "",
          f"Rounds: {st['rounds']} cost, {st['saturation_rounds']} saturation, "
          f"{st['stats_rounds']} in-traffic; in every round the workloads and the "
          f"configurations within each run in a random order (seed {result.get('seed')}). "
          f"Cost runs: {st['seconds']:g} s at a fixed offered load, "
          f"{st['http_rate']:,} requests/s (HTTP/1.1), {st.get('h2c_rate', 0):,} (h2c) or "
          f"{st['iperf_bitrate'] / 1e9:g} Gbit/s (iperf3), the same for every configuration; "
          "the figure is the CPU time of all CPUs (softirq included) per request or per GB. "
          "Ratios are paired by round; intervals are 95 % bootstrap intervals over rounds. "
          "Every run carries the same apparatus (a FIN/RST tcpdump on a debug interface, "
          "the CPU meter). Clients pinned to CPU "
          f"{m['client_cpu']}, nginx (1 worker) and iperf3 -s to CPU {m['server_cpu']}.", ""]
    kept = [r for r in result["runs"] if not r.get("discarded")]
    foreign = sorted(r["foreign_cpu"] for r in kept if r.get("foreign_cpu") is not None)
    if foreign:
        over = sum(1 for f in foreign if f > 0.05)
        L += [f"Other work on the machine (CPU time of processes not the bench's and of "
              f"other guests, bench/noise.py), per "
              f"run: median {_pct(statistics.median(foreign), 0)}, max {_pct(foreign[-1], 0)}"
              f"; {over} of {len(foreign)} runs above 5 %; {summary['discarded_runs']} runs "
              f"discarded and their group run again (over {_pct(st['max_foreign'], 0)})."]
        for key, what in (("kernel_cpu", "Kernel threads (ksoftirqd, kworkers), counted as "
                           "the bench's"),
                          ("unattributed_cpu", "Busy time charged to no process and no "
                           "interrupt tick (most likely softirq work on an otherwise idle "
                           "CPU, which this kernel's tick-sampled accounting does not "
                           "attribute), counted as the bench's")):
            shares = sorted(r[key] for r in kept if r.get(key) is not None)
            if shares:
                L += [f"{what}: median {_pct(statistics.median(shares), 0)}, max "
                      f"{_pct(shares[-1], 0)} of all CPU time per run."]
        L += [""]
    L += ["## Targets", "", "Verdicts: met when the whole 95 % interval is within the "
          "limit, not met when it is wholly beyond it, inconclusive when it straddles it.", "",
          "| target | measured: mean [95 % interval] (n) | verdict |", "|---|---|---|"]
    for t in summary["targets"]:
        meas = t["note"] if t["ci"] is None else \
            f"{_ci(t['ci'], '{:.3f}' if t['limit'] != 10.0 else '{:.1f}')} ({t['ci']['n']})"
        if t["ci"] is not None and t["note"]:
            meas += f"; {t['note']}"
        L.append(f"| {t['text']} | {meas} | {t['verdict']} |")
    L += ["", "## Cost at a fixed offered load", "",
          "CPU time per unit of work (median over rounds) and its ratio to untraced. "
          "'achieved' is the share of the offered requests h2load completed (below 100 % "
          "the configuration saturated the machine and its cost is understated).", ""]
    for wl, rows in summary["cost"].items():
        if not rows:
            continue
        unit = "CPU-us/request" if wl.startswith("http") or wl.startswith("h2c") \
            else "CPU-s/GB"
        L += [f"**{wl}**", "", f"| configuration | {unit} | / untraced [95 %] | achieved | "
              "softirq share |", "|---|---|---|---|---|"]
        for c, row in rows.items():
            L.append(f"| {labels.get(c, c)} | {_num(row['median'], '{:.3f}')} | "
                     f"{_ci(row['vs_untraced'])} | {_pct(row['achieved_share'], 0)} | "
                     f"{_pct(row['softirq_share'], 0)} |")
        L.append("")
    if any(summary["saturation"].values()):
        L += ["## Saturation throughput", "", "As fast as the clients go (requests/s, or "
              "Gbit/s for iperf3), median over rounds, and the ratio to untraced.", ""]
    for wl, rows in summary["saturation"].items():
        if not rows:
            continue
        scale, fmt = (1e-9, "{:.2f}") if wl.startswith("iperf3") else (1, "{:,.0f}")
        L += [f"**{wl}**", "", "| configuration | throughput | / untraced [95 %] |",
              "|---|---|---|"]
        for c, row in rows.items():
            L.append(f"| {labels.get(c, c)} | {_num(row['median'] and row['median'] * scale, fmt)}"
                     f" | {_ci(row['vs_untraced'])} |")
        L.append("")
    L += ["## In-traffic cost (program run-time statistics, the cost runs' load)", "",
          "ns per invocation of the classifier (both hooks; mean over rounds [95 %]), "
          "invocations per request, and the debug sink's ns per clone. The mirror clones "
          "inside its program (bpf_clone_redirect), so its figure includes the clone when "
          "it clones; the thesis clones in act_mirred, after its program, outside its "
          "figure. 'no budgets, clone off' decides and marks exactly as 'no budgets' but "
          "clones nothing: the difference is the clone's share; 'defaults, clone off' does "
          "the same beside 'mirror (clsact)' (its sink figure is the request frames user "
          "space writes, not clones).", "",
          "| workload | configuration | ns per invocation | per request | sink ns/clone |",
          "|---|---|---|---|---|"]
    for wl, rows in summary["in_traffic"].items():
        for c, row in rows.items():
            L.append(f"| {wl} | {labels.get(c, c)} | {_ci(row['ns'], '{:.1f}')} | "
                     f"{_num(row['runs_per_request'], '{:.2f}')} | "
                     f"{_num(row['sink_ns_per_clone'], '{:.0f}')} |")
        if summary["clone_ns"].get(wl):
            L.append(f"| {wl} | the clone (no budgets - clone off) | "
                     f"{_ci(summary['clone_ns'][wl], '{:.1f}')} | | |")
    L += [""]
    L += candidate_section(result, labels)
    L += _storm_table(result, labels)
    L += _completeness_table(summary, labels)
    L += per_packet_section(summary["microbench"], st["micro_rounds"])
    L += state_section(result.get("state") or {})
    L += _attach_section(summary)
    if plots:
        L += ["", "## Plots", ""]
        L += [f"![{name}]({path})" for name, path in plots.items()]
    if summary["failed_runs"]:
        L += ["", f"{summary['failed_runs']} run(s) failed; see `runs` in the JSON."]
    return "\n".join(L) + "\n"


def candidate_section(result: dict, labels: dict) -> list[str]:
    """Each mirror configuration against its twin compiled from the candidate's sources
    (--candidate, bench/configs.py), per pass and workload: candidate / this checkout,
    paired by round, on the pass's own figure."""
    cand = result.get("candidate")
    if not cand:
        return []
    L = ["## The candidate classifier against this checkout's", "",
         f"Candidate: the classifier sources in `{cand['dir']}` (commit "
         f"{cand.get('git_commit') or 'unknown'}). Each mirror configuration below ran "
         "twice in every round, compiled from this checkout's bpf/ and from the "
         "candidate's, each in a random place among the round's runs; the ratio is "
         "candidate / this checkout, paired by round, mean [95 %]. Cost and in-traffic: "
         "below 1, the candidate costs less; saturation: below 1, it gets less "
         "throughput.", "",
         "| pass | workload | configuration | figure | candidate / this checkout |",
         "|---|---|---|---|---|"]
    for pass_ in ("cost", "saturation", "in_traffic"):
        runs = _kept(result, pass_)
        for wl, cfgs in result.get("plans", {}).get(pass_, []):
            for twin in cfgs:
                base = twin.removesuffix(CANDIDATE)
                if base == twin or base not in cfgs:
                    continue
                figure = _figure(pass_, wl)
                ratio = compare(runs, wl, twin, base, figure)
                if ratio:
                    L.append(f"| {pass_} | {wl} | {labels.get(base, base)} | {figure} | "
                             f"{_ci(ratio)} ({ratio.get('n', '?')}) |")
    return L + [""]


def _storm_table(result, labels) -> list[str]:
    """What the classifier did in the 100 % error cost runs: clones made, clones skipped
    by each budget, events (per second of run, medians over rounds)."""
    runs = [r for r in _kept(result, "cost") if r.get("classifier")
            and r["workload"].endswith("-100")]
    if not runs:
        return []
    keys = ("mirrored_packets", "skip_flow_packets", "skip_flow_bytes", "skip_cpu_rate",
            "events", "events_lost")
    L = ["## The error storm: what the classifier did at 100 % errors", "",
         "Per second of cost run (median over rounds): packets cloned to the debug "
         "interface, clones skipped by the per-flow packet budget, the per-flow byte "
         "budget and the per-CPU clone rate, and error events (lost: ring buffer full).", "",
         "| workload | configuration | cloned/s | skipped: packets | bytes | rate | "
         "events/s | events lost |", "|---|---|---|---|---|---|---|---|"]
    pairs = sorted({(r["workload"], r["config"]) for r in runs})
    for wl, c in pairs:
        mine = [r for r in runs if r["workload"] == wl and r["config"] == c]
        cells = [_num(_median([r["classifier"][k] / r["wall_s"] for r in mine]))
                 for k in keys]
        L.append(f"| {wl} | {labels.get(c, c)} | " + " | ".join(cells) + " |")
    return L + [""]


def _completeness_table(summary, labels) -> list[str]:
    L = ["## Mirror completeness (every judged h2load run, summed)", "",
         "| configuration | runs complete | 5xx responses | error connections mirrored | "
         "success connections mirrored | packets mirrored | problems |",
         "|---|---|---|---|---|---|---|"]
    for c, v in summary["completeness"].items():
        L.append(f"| {labels.get(c, c)} | {v['complete_runs']}/{v['runs']} | "
                 f"{v['responses_5xx']:,} | {v['error_flows_mirrored']}/"
                 f"{v['error_connections']} | {v['ok_flows_mirrored']} | "
                 f"{v['mirrored_packets']:,} | {'; '.join(v['problems']) or '-'} |")
    return L


def _attach_section(summary) -> list[str]:
    att = summary.get("attach") or {}
    if not att:
        return []
    L = ["", "## New interfaces (python -m bench.attach)", "",
         f"Link creation to both hooks attached, and packets missed by a sender that starts "
         f"at 1000 packets/s the moment the link is up. ConMon (seed 002): attached "
         f"{CONMON_ATTACH_MS} ms after a container started, missed its first "
         f"{CONMON_MISSED} packets.", "",
         "| hook | interfaces | attach p50 (ms) | p99 | max | packets missed / sent | "
         "interfaces with a miss |", "|---|---|---|---|---|---|---|"]
    for hook, r in att.items():
        if hook == "containers":
            continue
        if "error" in r:
            L.append(f"| {hook} | failed: {r['error'][:80]} | | | | | |")
            continue
        L.append(f"| {hook} | {r['interfaces']} | {_num(r['attach_ms_p50'], '{:.1f}')} | "
                 f"{_num(r['attach_ms_p99'], '{:.1f}')} | {_num(r['attach_ms_max'], '{:.1f}')}"
                 f" | {r['packets_missed']} / {r['packets_sent']} | "
                 f"{r['interfaces_with_misses']} |")
    if "containers" in att:
        L += [""] + _containers_section(att["containers"])
    return L


CONTAINER_PATHS = {"link-event": "link-event watcher", "cni": "chained CNI plugin"}


def _containers_section(c: dict) -> list[str]:
    """The operator's case (python -m bench.containers) per attach mode, next to ConMon's
    figure, and what the plugin adds to a container's start (measured within the cni run,
    against containers without the plugin interleaved with its own). A result of the
    bench before the modes holds one summary (the link-event watcher's), not one per mode."""
    modes = c if set(c) <= set(ATTACH_MODES) else {"link-event": c}
    head = "Real podman containers (`python -m bench.containers`, clsact)"
    done = {m: r for m, r in modes.items() if "skipped" not in r and "error" not in r}
    L = []
    for m, r in modes.items():
        if m not in done:
            why = r.get("skipped") or f"failed: {r['error'][:200]}"
            L.append(f"{head}, attached by the {CONTAINER_PATHS[m]}: not measured ({why}).")
    if not done:
        return L
    any_r = next(iter(done.values()))
    sender = ("a static binary" if any_r.get("sender", "python3") == "static"
              else "python3")
    per = " per attach mode" if len(modes) > 1 else ""
    L += [f"{head}: {any_r['containers']} containers{per} on a bridge network, "
          f"each sending UDP at {any_r['rate_pps']:g} packets/s from its first instruction "
          f"({sender}). ConMon: attached {CONMON_ATTACH_MS} ms after the container started, "
          f"{CONMON_MISSED} packets missed.", "",
          "| attached by | podman run -> attached p50 / p99 (ms) | request -> attached p50 / "
          "p99 (ms) | podman run -> first packet p50 / p99 (ms) | margin p50, min (ms) | "
          "first packet before the attach | packets missed / sent |",
          "|---|---|---|---|---|---|---|"]

    def pair(r, key):
        return f"{_num(r[key + '_p50'], '{:.1f}')} / {_num(r[key + '_p99'], '{:.1f}')}"
    for m, r in done.items():
        label = CONTAINER_PATHS[m]
        if m == "cni":
            by = r["attached_by"]
            label += (f" ({by['cni']} by the plugin, {by['link-event']} by the link event "
                      f"first; {r['cni_unanswered']} ADDs unanswered)")
        L.append(f"| {label} | {pair(r, 'attach_ms')} | {pair(r, 'event_to_attached_ms')} | "
                 f"{pair(r, 'first_packet_ms')} | {_num(r['margin_ms_p50'], '{:.1f}')}, "
                 f"{_num(r['margin_ms_min'], '{:.1f}')} | {r['first_packet_before_attach']} "
                 f"of {r['containers']} | {r['packets_missed']} / {r['packets_sent']} |")
    cni = done.get("cni")
    if cni and "without_plugin" in cni:
        w = cni["without_plugin"]
        L += ["", f"What the plugin adds to a container's start: `podman run` to first packet "
              f"p50 {_num(cni['first_packet_ms_p50'], '{:.1f}')} / p99 "
              f"{_num(cni['first_packet_ms_p99'], '{:.1f}')} ms with it, "
              f"{_num(w['first_packet_ms_p50'], '{:.1f}')} / "
              f"{_num(w['first_packet_ms_p99'], '{:.1f}')} ms without it ({w['containers']} "
              f"containers on the same chain less the plugin, interleaved in the same run): "
              f"{_num(cni['plugin_adds_ms_p50'], '{:+.1f}')} ms at p50, "
              f"{_num(cni['plugin_adds_ms_p99'], '{:+.1f}')} ms at p99."]
    return L


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


STATE_KINDS = {
    "lru": "LRU hash (BPF_MAP_TYPE_LRU_HASH), global",
    "lrupc": "LRU hash, per-CPU lists (BPF_F_NO_COMMON_LRU)",
    "hash": "hash (BPF_MAP_TYPE_HASH), no eviction",
    "way1": "array, one slot per hash (direct-mapped), tag = the key",
    "way4": "array, 4-way buckets by hash, least recently touched slot replaced "
            "(the classifier's)"}
EVENT_WAYS = {
    "keep": "decoded and kept for `mirror events`",
    "file": "the same, and a JSON line in the events file",
    "file+frame": "the same, and the request frame written to the debug interface"}


def state_section(state: dict) -> list[str]:
    """The state pass: one connection state's cost per packet by kind of map
    (bench.statecost), and user space's CPU per error event (bench.eventcost)."""
    L = []
    sc, ec = state.get("statecost"), state.get("eventcost")
    if sc and "error" not in sc:
        r, med = sc["per_round_ns"], sc["median_ns"]
        L += ["", "## One connection state per packet (python -m bench.statecost)", "",
              f"BPF_PROG_TEST_RUN on one pinned CPU, {sc['slots']:,} slots, "
              f"{sc['hot']:,} connections taking turns; ns per packet above the same program "
              f"without a map ({med['base']:.1f} ns), median of {sc['rounds']} rounds "
              "[lowest, highest]. 'hit': a packet of a connection whose state is there; "
              "'new': a packet that starts a connection, the map as full as it gets (the "
              "insert and, where the kind evicts, the eviction).", "",
              "| kind of map | hit | new |", "|---|---|---|"]
        for kind, what in STATE_KINDS.items():
            if f"{kind}_hit" in med:
                L.append(f"| {what} | " + " | ".join(
                    f"{med[f'{kind}_{w}']:.0f} [{min(r[f'{kind}_{w}']):.0f}, "
                    f"{max(r[f'{kind}_{w}']):.0f}]" for w in ("hit", "new")) + " |")
    elif sc:
        L += ["", f"bench.statecost failed: {one_line(sc['error'])}"]
    if ec and "error" not in ec:
        L += ["", "## User space per error event (python -m bench.eventcost)", "",
              f"Bursts of {ec['events']:,} real events (the classifier answering error "
              "responses on BPF_PROG_TEST_RUN, each with its 512-byte request) drained by "
              "the controller's own reader; CPU time of the draining thread per event, "
              f"median of {ec['rounds']} rounds [lowest, highest], and the events per second "
              "one core could take at that cost.", "",
              "| what each event costs | CPU us per event | events/s per core |",
              "|---|---|---|"]
        for way, what in EVENT_WAYS.items():
            us = ec["per_round_us"].get(way)
            if us:
                L.append(f"| {what} | {ec['us_per_event'][way]:.1f} [{min(us):.1f}, "
                         f"{max(us):.1f}] | {ec['events_per_cpu_second'][way]:,} |")
    elif ec:
        L += ["", f"bench.eventcost failed: {one_line(ec['error'])}"]
    ku = state.get("keepup")
    if ku and "error" not in ku:
        L += ["", "## Keeping up at the bound (python -m bench.eventcost --keep-up)", "",
              f"One producer process per CPU ({ku['cpus']}) offers "
              f"{ku['offered_per_cpu']:,} error responses a second for {ku['seconds']:g} s "
              "through the classifier (BPF_PROG_TEST_RUN, the default event bounds); the "
              "controller's own reader writes each event's JSON line and request frame.", "",
              "| errors | events | held by the bound | lost | read | events/s | "
              "last read after the end | reader's CPU |", "|---|---|---|---|---|---|---|---|",
              f"| {ku['errors']:,} | {ku['events']:,} | {ku['events_rate_limited']:,} | "
              f"{ku['events_lost']:,} | {ku['handled']:,} | {ku['events_per_second']:,} | "
              f"{ku['last_read_ms_after_the_end']:g} ms | {ku['reader_cpu_share']:.0%} of a "
              "core |"]
    elif ku:
        L += ["", f"bench.eventcost --keep-up failed: {one_line(ku['error'])}"]
    return L


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
    # Results before the connection state (b77bf4a) name the mirror's flow map "flows".
    held_conns = mirror.get("conns", mirror.get("flows"))
    L = ["", "### With the maps 90 % full", "",
         f"The same packets with the mirror's connection states holding {_num(held_conns)} "
         f"other connections and its request slots {_num(mirror.get('requests'))} kept "
         f"requests, and the thesis's connection map {_num(thesis.get('connections'))} "
         "connections (the fewest any round held), against the rows with one other flow "
         "marked: a lookup that misses, the insert that marks a flow, a lookup that hits. "
         "The caches stay hot, so this is the cost of fuller buckets and of slot or LRU "
         "bookkeeping, not of the cache misses a large map adds in traffic.", "",
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


def print_targets(summary: dict) -> None:
    print("\nTargets:")
    for t in summary["targets"]:
        meas = t["note"] if t["ci"] is None else _ci(t["ci"])
        print(f"  {t['verdict'].upper():<12} {t['text']}: {meas}")


# --- the scale mode (python -m bench.scale) -------------------------------------------
SATURATED = 0.9             # busy share of the k CPUs below which a run was not saturated


def scale_summary(result: dict) -> list[dict]:
    """Per CPU count, error level and configuration: median req/s and mean request time
    over rounds, the paired ratio to untraced, and the speedup over the smallest k."""
    ok = [r for r in result["runs"] if "error" not in r]
    rows = []
    for point in result["points"]:
        for pct in result["settings"]["error_levels"]:
            cell = [r for r in ok if r["k"] == point["k"] and r["error_pct"] == pct]
            base = {r["round"]: r["req_per_s"] for r in cell if r["config"] == BASE}
            for c in result["configs"]:
                mine = [r for r in cell if r["config"] == c["key"]]
                ratios = [r["req_per_s"] / base[r["round"]] for r in mine
                          if base.get(r["round"])]
                rows.append({
                    "k": point["k"], "error_pct": pct, "config": c["key"], "rounds": len(mine),
                    "req_per_s": _median([r["req_per_s"] for r in mine]),
                    "mean_us": _median([r["latency"].get("mean_us") for r in mine]),
                    "cpu_busy": _median([r["cpu_busy"] for r in mine]),
                    "ratio": round(_median(ratios), 4) if ratios else None,
                    "ratios": [round(x, 4) for x in ratios],
                    "complete": all(r["mirror"]["complete"] for r in mine if "mirror" in r),
                    "max_foreign_cpu": max((r["foreign_cpu"] or 0 for r in mine), default=None),
                })
    first = {}
    for row in rows:            # points are in increasing k: the first seen is the smallest
        key = (row["error_pct"], row["config"])
        first.setdefault(key, row["req_per_s"])
        row["speedup"] = (round(row["req_per_s"] / first[key], 3)
                          if row["req_per_s"] and first[key] else None)
    return rows


def _scale_cell(row: dict | None) -> str:
    if not row or row["req_per_s"] is None:
        return "failed"
    text = f"{row['req_per_s'] / 1000:,.1f}"
    if row["config"] != BASE and row["ratio"] is not None:
        text += f" ({100 * row['ratio']:.0f} %)"
    if row["speedup"] is not None:
        text += f", x{row['speedup']:.2f}"
    if row["mean_us"] is not None:
        text += f", {row['mean_us']:,.0f} us"
    if not row["complete"]:
        text += ", **mirror incomplete**"
    return text


def scale_markdown(result: dict) -> str:
    """The scale section of a report: the machine's CPU count, the layout per k and one
    table per error level."""
    rows = result.get("summary") or scale_summary(result)
    m, st = result["machine"], result["settings"]
    labels = {c["key"]: c["label"] for c in result["configs"]}
    keys = [c["key"] for c in result["configs"]]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(result["started"]))
    out = [
        "## Scale: HTTP throughput by CPU count", "",
        f"Machine: **{m['cpus']} CPUs** ({m['usable_cpus']} usable by the bench), "
        f"{m['cpu_model'] or 'unknown model'}, Linux {m['kernel']}; {m['h2load']}, "
        f"{m['nginx']}. Run of {when} at commit {m['git_commit'] or 'unknown'}: "
        f"{st['rounds']} round(s) of {st['seconds']:g} s per configuration, error level and "
        f"CPU count, configurations in a random order in every round (seed {st['seed']}).",
        "",
        "The thesis's figure 5.8 (48-core server): untraced throughput grew linearly to 24 "
        "cores; the monitored one followed it to 12 cores and then stopped growing. Read "
        "the speedup (throughput over the smallest CPU count's) down each column: a "
        "monitor with a bottleneck shared by all CPUs stops growing while untraced goes on.",
        "",
        f"Layout ({st['layout']}): h2load `--h1 -m 1`, {st['connections_per_cpu']} "
        "connections per CPU, all asking `/ok` (0 % errors) or `/error` (100 %); nginx "
        "workers pinned one per server CPU.",
        "",
        "| k | clients: CPUs (h2load threads) | servers: CPUs (nginx workers) | connections |",
        "|---|---|---|---|",
    ]
    for p in result["points"]:
        out.append(f"| {p['k']} | {_span(p['client_cpus'])} ({p['h2load_threads']}) | "
                   f"{_span(p['server_cpus'])} ({p['nginx_workers']}) | {p['connections']} |")
    for pct in st["error_levels"]:
        out += ["", f"Thousands of requests/s at {pct} % errors (median over rounds; "
                "paired ratio to untraced; speedup over the smallest k; mean request time):",
                "", "| k | " + " | ".join(labels[k] for k in keys) + " |",
                "|---|" + "---|" * len(keys)]
        for p in result["points"]:
            by = {r["config"]: r for r in rows if r["k"] == p["k"] and r["error_pct"] == pct}
            out.append(f"| {p['k']} | " + " | ".join(_scale_cell(by.get(k)) for k in keys)
                       + " |")
    out += ["", *_scale_notes(result, rows)]
    return "\n".join(out) + "\n"


def _span(cpus: list[int]) -> str:
    if len(cpus) > 2 and cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def _scale_notes(result: dict, rows: list[dict]) -> list[str]:
    notes = []
    failed = [r for r in result["runs"] if "error" in r]
    if failed:
        notes.append(f"- {len(failed)} run(s) failed: " + "; ".join(
            f"k={r['k']} {r['config']} {r['error_pct']} %: {one_line(r['error'])[:80]}"
            for r in failed[:3]))
    foreign = max((r["max_foreign_cpu"] or 0 for r in rows), default=0)
    notes.append(f"- Foreign CPU (other processes' share of all CPUs during a run, "
                 f"bench/noise.py): at most {100 * foreign:.0f} %.")
    idle = sorted({(r["k"], r["error_pct"]) for r in rows
                   if r["cpu_busy"] is not None and r["cpu_busy"] < SATURATED})
    if idle:
        notes.append(f"- The k CPUs had idle time (less than {100 * SATURATED:.0f} % busy, "
                     "median over rounds) at " +
                     ", ".join(f"k={k} ({p} % errors)" for k, p in idle) +
                     ": there the throughput is not a saturation figure (more "
                     "--connections-per-cpu may help).")
    mirroring = [r for r in result["runs"] if "mirror" in r]
    if mirroring:
        bad = [r for r in mirroring if not r["mirror"]["complete"]]
        notes.append(f"- Mirroring checked by the debug interface's packet counter in "
                     f"{len(mirroring)} runs: {len(bad)} incomplete.")
    if result["machine"]["usable_cpus"] < 4:
        notes.append(f"- With {result['machine']['usable_cpus']} CPUs this only shows the "
                     "method; the thesis's bottleneck appeared past 12 cores.")
    return notes


def one_line(text: str) -> str:
    """An error message (h2load's output, a traceback's last line) on one line."""
    return " ".join(text.split())


# --- result files ----------------------------------------------------------------------
ONE_LINE_EACH = ("runs", "microbench", "plans")


def to_json(obj, level: int = 0, expand: int = 5) -> str:
    """JSON with the outer `expand` levels indented and everything deeper on one line;
    one line per run: readable and diffable at a fraction of fully indented size."""
    pad = " " * level
    if level < expand and isinstance(obj, dict) and obj:
        items = [f'{pad} {json.dumps(str(k))}: '
                 f'{to_json(v, level + 1, 2 if k in ONE_LINE_EACH else expand).lstrip()}'
                 for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if level < expand and isinstance(obj, list) and obj and isinstance(obj[0], (dict, list)):
        return pad + "[\n" + ",\n".join(to_json(v, level + 1, expand) for v in obj) + \
            "\n" + pad + "]"
    return pad + json.dumps(obj, separators=(", ", ": "))


def write(result: dict, json_path: Path, md: str, latest: bool = False) -> Path:
    """The one writer of result files, for every mode: the JSON at `json_path`, the
    Markdown beside it (.md); with `latest`, copies of both as latest.json and latest.md
    in the same directory, for whoever reads the newest run without knowing its time."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(to_json(result) + "\n")
    json_path.with_suffix(".md").write_text(md)
    if latest:
        shutil.copyfile(json_path, json_path.parent / "latest.json")
        (json_path.parent / "latest.md").write_text(md)
    return json_path
