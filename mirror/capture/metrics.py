"""Prometheus metrics of the capture sidecar (`mirror capture --metrics-addr`)."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class SidecarCollector:
    """The sidecar's health, read from its status at scrape time."""

    def __init__(self, sidecar):
        self.sidecar = sidecar

    def collect(self):
        s = self.sidecar.status()
        counters = [
            ("packets_captured", "mirror_capture_packets_captured",
             "Packets tcpdump wrote (its own count)"),
            ("packets_received", "mirror_capture_packets_received",
             "Packets the capture filter received"),
            ("packets_dropped_kernel", "mirror_capture_packets_dropped",
             "Packets the kernel dropped because tcpdump's buffer was full"),
            ("packets_indexed", "mirror_capture_packets_indexed",
             "Packets read back from the pcaps by the indexer"),
            ("flows_indexed", "mirror_capture_flows_indexed",
             "Error flows written to the index"),
            ("files_pruned", "mirror_capture_files_pruned",
             "Pcap files deleted to keep the ring bounded"),
            ("packets_unindexed", "mirror_capture_packets_unindexed",
             "Packets tcpdump wrote that the ring overwrote before the indexer read them"),
            ("files_reordered", "mirror_capture_files_reordered",
             "Closed pcap files rewritten with requests moved before their responses"),
            ("requests_moved", "mirror_capture_requests_moved",
             "Request frames moved before the response they got"),
            ("tcpdump_restarts", "mirror_capture_tcpdump_restarts",
             "Times tcpdump exited by itself (debug interface gone) and was restarted"),
            ("flows_evicted", "mirror_capture_flows_evicted",
             "Open flows written to the index early to stay within the open-flow cap"),
            ("segments_dropped", "mirror_capture_segments_dropped",
             "Data segments of indexed flows not read: past the per-direction cap"),
            ("segments_cut", "mirror_capture_segments_cut",
             "Data segments of indexed flows kept shorter: past the per-flow payload cap"),
            ("requests_dropped", "mirror_capture_requests_dropped",
             "Request lines left out of index records: past the per-record cap"),
            ("index_rotations", "mirror_capture_index_rotations",
             "Times index.jsonl was renamed index.jsonl.1 to stay within its size"),
        ]
        for key, name, doc in counters:
            yield CounterMetricFamily(name, doc, value=s[key])
        yield GaugeMetricFamily("mirror_capture_files", "Pcap files on disk", value=s["files"])
        yield GaugeMetricFamily("mirror_capture_bytes", "Bytes of pcap files on disk",
                                value=s["bytes"])
        yield GaugeMetricFamily("mirror_capture_flows_open",
                                "Flows read but not yet written to the index",
                                value=s["flows_open"])
        yield GaugeMetricFamily("mirror_capture_index_bytes",
                                "Bytes of the index (both generations) on disk",
                                value=s["index_bytes"])
        yield GaugeMetricFamily("mirror_capture_payload_bytes_kept",
                                "Payload bytes the open flows hold in memory",
                                value=s["payload_bytes_kept"])
        yield GaugeMetricFamily("mirror_capture_up", "1 while tcpdump is recording",
                                value=1 if s["state"] == "capturing" else 0)
