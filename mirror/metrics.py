"""Prometheus metrics, read from the BPF maps at scrape time (no polling loop)."""
from __future__ import annotations

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)

# counter name in bpf/mirror.h -> (metric name, help)
_SIMPLE = {
    "packets": ("mirror_classifier_packets", "Packets the classifier saw, all interfaces"),
    "tcp": ("mirror_tcp_packets", "TCP segments whose headers parsed"),
    "other": ("mirror_other_packets", "Non-IP, non-TCP or non-first-fragment packets passed"),
    "malformed": ("mirror_malformed_packets", "Packets with truncated or bogus headers"),
    "nonlinear": ("mirror_nonlinear_packets",
                  "Packets whose headers were not in the skb's linear part (skipped)"),
    "flows_marked": ("mirror_flows_marked", "Connections marked by a trigger status code"),
    "mirrored_packets": ("mirror_mirrored_packets", "Clones sent to the debug interface"),
    "mirrored_bytes": ("mirror_mirrored_bytes", "Bytes cloned to the debug interface"),
    "clone_failures": ("mirror_clone_failures",
                       "bpf_clone_redirect() failures (originals unaffected)"),
    "no_debug_if": ("mirror_no_debug_iface", "Packets not mirrored: no debug interface set"),
    "iface_slot_taken": ("mirror_iface_stats_slot_taken",
                         "Responses/mirrored packets missing from per-interface stats: "
                         "their slot belongs to another interface"),
    "clones_deduplicated": ("mirror_clones_deduplicated",
                            "Clones not made at egress: the packet entered through a "
                            "monitored interface, whose ingress hook cloned it"),
}


_ZERO_STATS = dict.fromkeys(("1xx", "2xx", "3xx", "4xx", "5xx", "other", "mirrored_packets",
                             "mirrored_bytes"), 0)


class MapCollector:
    def __init__(self, controller):
        self.ctl = controller

    def collect(self):
        ctl = self.ctl
        if ctl.classifier is None:
            return
        counters = ctl.classifier.counters()
        for key, (name, doc) in _SIMPLE.items():
            yield CounterMetricFamily(name, doc, value=counters[key])
        names = {att.ifindex: att.ifname for att in ctl.attached.values()}
        resp = CounterMetricFamily("mirror_http_responses",
                                   "HTTP/1.x responses seen, by interface, direction and "
                                   "status class", labels=["iface", "direction", "class"])
        mirrored = CounterMetricFamily("mirror_iface_mirrored_packets",
                                       "Packets mirrored, by interface and direction",
                                       labels=["iface", "direction"])
        stats_by_key = ctl.classifier.iface_stats()
        for ifindex in names:       # attached interfaces show zeros before any traffic
            for direction in ("ingress", "egress"):
                stats_by_key.setdefault((ifindex, direction), _ZERO_STATS)
        for (ifindex, direction), stats in sorted(stats_by_key.items()):
            iface = names.get(ifindex, f"ifindex{ifindex}")
            for cls in ("1xx", "2xx", "3xx", "4xx", "5xx", "other"):
                resp.add_metric([iface, direction, cls], stats[cls])
            mirrored.add_metric([iface, direction], stats["mirrored_packets"])
        yield resp
        yield mirrored
        active = ctl.classifier.flow_count()
        yield GaugeMetricFamily("mirror_flows_active", "Marked flows now in the map",
                                value=active)
        # The LRU map evicts silently; what left the map and was not expired by the sweep
        # was evicted (or, rarely, re-marked after an expiry).
        yield CounterMetricFamily(
            "mirror_flows_evicted", "Marked flows pushed out of the full map (LRU)",
            value=max(0, counters["flows_marked"] - active - ctl.expired_total))
        yield GaugeMetricFamily("mirror_flows_capacity", "Size of the flow map (--max-flows)",
                                value=ctl.opts.max_flows)
        yield CounterMetricFamily("mirror_flows_expired",
                                  "Flows removed by the idle sweep", value=ctl.expired_total)
        yield CounterMetricFamily("mirror_debug_iface_recreated",
                                  "Times the debug interface was found missing and recreated",
                                  value=ctl.debug_recreated_total)
        yield GaugeMetricFamily("mirror_interfaces_attached", "Interfaces with hooks attached",
                                value=len(ctl.attached))
        yield from _discovery_metrics(ctl)


def _discovery_metrics(ctl):
    """Interfaces attached as they appear (mirror.discovery)."""
    hist = ctl.attach_latency
    yield HistogramMetricFamily(
        "mirror_attach_latency_seconds", "From an interface's link event reaching the "
        "controller to both of its hooks attached", buckets=hist.buckets(), sum_value=hist.sum)
    yield CounterMetricFamily("mirror_attach_failures",
                              "Interfaces a pattern selected that could not be attached",
                              value=ctl.attach_failures_total)
    disc = ctl.discovery
    yield CounterMetricFamily("mirror_interfaces_skipped",
                              "Interfaces a pattern selected but not attached: --max-ifaces "
                              "was reached", value=disc.skipped_total if disc else 0)
    yield CounterMetricFamily("mirror_link_resyncs",
                              "Full re-reads of the link table after lost link events",
                              value=disc.resyncs if disc else 0)
