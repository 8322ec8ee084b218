"""Prometheus metrics, read from the BPF maps at scrape time (no polling loop)."""
from __future__ import annotations

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from .abi import CUT_REASONS, GRPC_CLASSES, RESPONSE_BOUNDS_S, STATUS_CLASSES
from .ownership import cni_unanswered

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
    "h2_status_unknown": ("mirror_h2_status_unknown",
                          "HTTP/2 HEADERS frames whose :status could not be read without "
                          "HPACK state (a dynamic table reference), or was cut or bogus"),
    "grpc_status_unknown": ("mirror_grpc_status_unknown",
                            "HTTP/2 stream-ending header blocks with no readable grpc-status "
                            "but a dynamic table reference that may be one, or with a "
                            "grpc-status value that is cut or not 0-16"),
    "iface_slot_taken": ("mirror_iface_stats_slot_taken",
                         "Responses/mirrored packets missing from per-interface stats: "
                         "their slot belongs to another interface"),
    "syn_unmarked": ("mirror_flows_unmarked_syn",
                     "Marked connections unmarked by a SYN: a new connection reusing the "
                     "4-tuple"),
    "requests": ("mirror_requests_kept", "HTTP/1.x request starts from clients kept"),
    "request_busy": ("mirror_requests_not_kept_busy",
                     "HTTP/1.x request starts not kept: another CPU was writing the entry "
                     "they share at that instant (the connection's next error is reported "
                     "without a request)"),
    "request_changed": ("mirror_events_request_changed",
                        "Error events whose request was rewritten while the event read it: "
                        "sent without it (or lost, the ring buffer being full)"),
    "status_from_client": ("mirror_statuses_from_client",
                           "Statuses sent by a connection's client side, or travelling in "
                           "its direction: never counted as responses"),
    "status_side_unknown": ("mirror_statuses_side_unknown",
                            "Statuses on connections whose client side is not known (start "
                            "and requests unseen, e.g. open before the attach): not counted"),
    "resp_no_request": ("mirror_responses_without_request",
                        "Error responses with no request kept for them"),
    "events": ("mirror_events", "Error events handed from the kernel to user space"),
    "events_lost": ("mirror_events_lost",
                    "Error events lost because the ring buffer was full"),
    "seen_before": ("mirror_packets_seen_before",
                    "Packets at egress that entered through a monitored interface: counted, "
                    "cloned and reported there, not again"),
    "lo_second_pass": ("mirror_loopback_second_pass",
                       "Packets at a monitored lo's ingress, already handled at its egress"),
    "conns_started": ("mirror_connections_started",
                      "Connection states started (a SYN, or a request when the SYN went "
                      "unseen)"),
    "conns_replaced": ("mirror_connections_replaced",
                       "Connection states whose slot a new connection took (the least "
                       "recently active of its bucket)"),
    "side_from_request": ("mirror_connections_side_from_request",
                          "Connections whose start was not seen, their client side learned "
                          "from a request"),
    "errors_uncounted": ("mirror_error_responses_uncounted",
                         "Error responses missing from mirror_error_responses_total: the "
                         "kernel's table of (interface, status, protocol) was full"),
}


_CLASSES = STATUS_CLASSES
# gRPC responses by grpc-status: 0 ("ok") and 1-16 ("error"), under proto="grpc".
_GRPC_CLASSES = GRPC_CLASSES
_ZERO_STATS = dict.fromkeys((*_CLASSES, *(f"h2_{c}" for c in _CLASSES), "mirrored_packets",
                             "mirrored_bytes", *(f"grpc_{c}" for c in _GRPC_CLASSES)), 0)
# Why a server's HPACK state is not followed: the hpack_* counters of bpf/mirror.h.
_HPACK_REASONS = ("start_unseen", "gap", "bounds", "forgotten")
# proto label -> prefix of the iface_stats keys
_PROTOS = {"h1": "", "h2": "h2_"}


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
        held = CounterMetricFamily("mirror_events_suppressed",
                                   "Error events not emitted (every error is still counted in "
                                   "mirror_error_responses_total): the CPU's events per second "
                                   "(--max-events-per-second) or the connection's "
                                   "(--max-events-per-connection) were spent",
                                   labels=["reason"])
        held.add_metric(["rate"], counters["events_rate_limited"])
        held.add_metric(["connection"], counters["events_conn_limited"])
        yield held
        skipped = CounterMetricFamily("mirror_clones_skipped",
                                      "Clones of marked connections skipped by a budget: "
                                      "the connection's packets or bytes (--max-packets/"
                                      "bytes-per-flow), the CPU's clones per second "
                                      "(--max-clones-per-second)", labels=["reason"])
        for reason in CUT_REASONS.values():
            skipped.add_metric([reason], counters[f"skip_{reason}"])
        yield skipped
        hpack = CounterMetricFamily("mirror_hpack_not_followed",
                                    "Why dynamic table references of HTTP/2 servers could "
                                    "not be resolved (they count as unknown statuses): a "
                                    "connection's HPACK state stopped being followed, once "
                                    "per connection (start_unseen: its handshake went unseen; "
                                    "gap: a server segment not walked; bounds: a segment not "
                                    "walked to its end), or a reference named an insertion "
                                    "whose record the connection had dropped (forgotten)",
                                    labels=["reason"])
        for reason in _HPACK_REASONS:
            hpack.add_metric([reason], counters[f"hpack_{reason}"])
        yield hpack
        # A snapshot: the run loop renames and forgets interfaces while a scrape runs. The
        # per-interface series are those of the interfaces attached now: an interface
        # (and so its workload) that is gone has its series removed (its kernel
        # counts are freed when it is forgotten).
        attached = list(ctl.attached.values())
        names = {att.ifindex: att.ifname for att in attached}
        who = {i: [names[i], *_workload_labels(ctl, i)] for i in names}
        resp = CounterMetricFamily("mirror_http_responses",
                                   "HTTP responses seen, by interface (and its workload), "
                                   "direction, status class and protocol (h1: HTTP/1.x, "
                                   "h2: HTTP/2; grpc: grpc-status, class ok or error)",
                                   labels=[*IFACE_LABELS, "direction", "class", "proto"])
        mirrored = CounterMetricFamily("mirror_iface_mirrored_packets",
                                       "Packets mirrored, by interface (and its workload) "
                                       "and direction",
                                       labels=[*IFACE_LABELS, "direction"])
        stats_by_key = ctl.classifier.iface_stats()
        for ifindex in names:       # attached interfaces show zeros before any traffic
            for direction in ("ingress", "egress"):
                stats_by_key.setdefault((ifindex, direction), _ZERO_STATS)
        for (ifindex, direction), stats in sorted(stats_by_key.items()):
            if ifindex not in who:
                continue            # forgotten since the scrape began
            for proto, prefix in _PROTOS.items():
                for cls in _CLASSES:
                    resp.add_metric([*who[ifindex], direction, cls, proto],
                                    stats[prefix + cls])
            for cls in _GRPC_CLASSES:
                resp.add_metric([*who[ifindex], direction, cls, "grpc"], stats[f"grpc_{cls}"])
            mirrored.add_metric([*who[ifindex], direction], stats["mirrored_packets"])
        yield resp
        yield mirrored
        yield from _workload_metrics(ctl)
        active = ctl.classifier.flow_count()
        yield GaugeMetricFamily("mirror_flows_active", "Marked flows now in the map",
                                value=active)
        yield CounterMetricFamily(
            "mirror_flows_evicted", "Marked connections whose state slot a new connection "
            "took", value=counters["flows_evicted"])
        yield GaugeMetricFamily("mirror_flows_capacity", "Connection state slots (--max-flows, "
                                "rounded up to a power of two)",
                                value=ctl.classifier.max_flows)
        yield CounterMetricFamily("mirror_flows_expired",
                                  "Flows removed by the idle sweep", value=ctl.expired_total)
        yield CounterMetricFamily("mirror_debug_iface_recreated",
                                  "Times the debug interface was found missing and recreated",
                                  value=ctl.debug_recreated_total)
        yield GaugeMetricFamily("mirror_interfaces_attached", "Interfaces with hooks attached",
                                value=len(attached))
        yield from _discovery_metrics(ctl)
        errors = CounterMetricFamily("mirror_controller_errors",
                                     "Errors of the controller's run loop, by stage (each "
                                     "retried with backoff; the hooks stay in place)",
                                     labels=["stage"])
        event_errors = ctl.events.errors if ctl.events is not None else 0
        for stage, n in ctl.stage_errors.items():
            errors.add_metric([stage], n + (event_errors if stage == "events" else 0))
        yield errors
        yield from self._errors(ctl, who)
        if ctl.events is not None:
            yield CounterMetricFamily("mirror_request_frames_written",
                                      "Request frames of error responses written to the "
                                      "debug interface", value=ctl.events.writer.written)

    @staticmethod
    def _errors(ctl, who: dict[int, list[str]]):
        """Error responses as the kernel counted them, exact whatever the events' bounds
        held back, and the time from each kept request to its error response."""
        errors = CounterMetricFamily("mirror_error_responses",
                                     "Error responses (trigger statuses from the server "
                                     "side), by interface, its workload (namespace, pod, "
                                     "container), protocol (h1: HTTP/1.x, h2: HTTP/2 "
                                     ":status, grpc: grpc-status) and status (grpc:N for "
                                     "a grpc-status)",
                                     labels=[*IFACE_LABELS, "proto", "status"])
        by_label: dict[tuple[str, ...], int] = {}
        for (ifindex, status, proto), n in ctl.classifier.errors().items():
            if ifindex not in who:
                continue            # an interface forgotten since the scrape began
            label = f"grpc:{status}" if proto == "grpc" else str(status)
            key = (*who[ifindex], proto, label)
            by_label[key] = by_label.get(key, 0) + n
        for labels, n in sorted(by_label.items()):
            errors.add_metric(list(labels), n)
        yield errors
        counts, total = ctl.classifier.response_times()
        buckets, running = [], 0
        for bound, n in zip((*(f"{b:g}" for b in RESPONSE_BOUNDS_S), "+Inf"), counts):
            running += n
            buckets.append((bound, running))
        yield HistogramMetricFamily("mirror_error_response_seconds",
                                    "Time from a request to its error response, as the "
                                    "classifier saw them (errors whose request was kept)",
                                    buckets=buckets, sum_value=total)


IFACE_LABELS = ("iface", "namespace", "pod", "container")


def _workload_labels(ctl, ifindex: int) -> list[str]:
    """namespace, pod and container of the workload behind the interface, as cAdvisor
    and kube-state-metrics name them ("" when not known, or not known yet)."""
    if ctl.workloads is None:
        return ["", "", ""]
    w = ctl.workloads.lookup(ifindex)
    labels = w.labels()
    return [labels["namespace"], labels["pod"], labels["container"]]


def _workload_metrics(ctl):
    """How naming the workloads goes: the runtimes asked, their failures (an absent,
    refused, slow or hung runtime socket costs a counter and a warning, never an attach
    or an event)."""
    if ctl.workloads is None:
        return
    s = ctl.workloads.stats
    yield CounterMetricFamily("mirror_workload_lookups", "Workload names asked for",
                              value=s.lookups)
    yield CounterMetricFamily("mirror_workload_lookups_pending",
                              "Workload names asked for before the runtimes answered "
                              "(the answer came later)", value=s.pending)
    failures = CounterMetricFamily("mirror_workload_runtime_failures",
                                   "Calls to a container runtime that failed, by runtime "
                                   "and reason (absent, refused, denied, timeout, "
                                   "bad-answer, error)", labels=["runtime", "reason"])
    for (runtime, reason), n in sorted(dict(s.failures).items()):
        failures.add_metric([runtime, reason], n)
    yield failures


def _discovery_metrics(ctl):
    """Interfaces attached as they appear (mirror.discovery)."""
    atts = ctl.attachments
    if atts is None:
        return
    hist = atts.latency
    yield HistogramMetricFamily(
        "mirror_attach_latency_seconds", "From an interface's link event reaching the "
        "controller to both of its hooks attached", buckets=hist.buckets(), sum_value=hist.sum)
    yield CounterMetricFamily("mirror_attach_failures",
                              "Interfaces a pattern selected that could not be attached",
                              value=atts.failures_total)
    disc = ctl.discovery
    yield CounterMetricFamily("mirror_interfaces_skipped",
                              "Interfaces a pattern selected but not attached: --max-ifaces "
                              "was reached", value=disc.skipped_total if disc else 0)
    yield CounterMetricFamily("mirror_link_resyncs",
                              "Full re-reads of the link table after lost link events",
                              value=disc.resyncs if disc else 0)
    cni = CounterMetricFamily("mirror_cni_requests",
                              "Interfaces a chained CNI plugin (tc-mirror) asked about, by "
                              "what became of them", labels=["outcome"])
    for outcome, n in (disc.cni_requests if disc else {}).items():
        cni.add_metric([outcome], n)
    yield cni
    yield CounterMetricFamily("mirror_cni_unanswered",
                              "CNI ADDs that no controller of this network namespace answered "
                              "(counted by the plugin in the state directory): containers "
                              "not hooked before their first packet", value=cni_unanswered())
