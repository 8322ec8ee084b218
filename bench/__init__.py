"""The bench suite: what the mirror costs an operator's traffic, side by side with no
monitor, with `tcpdump -w` and with the original thesis monitor (thesis chapters 4.2 and
5). Method and results: docs/bench.md.

Topology (bench/lab.py): nginx (one worker, /ok 200 and /error 500 of equal length,
HTTP/1.1 and h2c) and `iperf3 -s` in a server network namespace; clients in the root
namespace; the host-side veth is monitored. Client and server pinned to one CPU each.

Configurations (bench/configs.py): untraced, qdiscs only, an empty classifier on clsact
(the hook's floor), tcpdump -w, the mirror in its three hook layouts and with each feature
of this round switched off (request snapshot, HTTP/2 parser, budgets, clone), the thesis
monitor reproduced (bench/bpf/thesis.c).

Passes (bench/runner.py), in rounds, every round in a random order:
  - cost: fixed offered load (h2load --rps, iperf3 -b), CPU time of all CPUs per request
    or per GB (bench/noise.py CpuMeter), completeness judged in every h2load run
    (bench/completeness.py);
  - saturation: throughput as fast as the clients go;
  - in-traffic: program run-time statistics under the cost runs' load;
  - microbench: BPF_PROG_TEST_RUN per frame class (bench/microbench.py, bench/bigmaps.py);
  - attach: new interfaces, latency and packets missed (bench/attach.py).
Statistics (bench/stats.py): paired ratios, 95 % bootstrap intervals, verdicts met / not
met / inconclusive. Reports (bench/report.py, bench/plots.py):
bench/results/<timestamp>.{json,md,png} and latest.{json,md}.

The scale mode (python -m bench.scale, bench/scale.py): every CPU of a bigger machine,
through the same pipeline: the same preflight and machine record (bench/machine.py),
runner (bench/runner.py), h2load runner (bench/workloads.py) and result writer
(bench/report.py). Apart: bench/profile.py (where the classifier's time goes in
traffic, by source line), bench/snapshot_cost.py (the request snapshot by length).

OVERHEAD: the bench keeps both CPUs busy for its whole run (about 50 minutes in full mode,
about 3 with --quick) and measures the whole machine's CPU time: run it on a machine with
nothing else to do. It only sends traffic between the namespaces it makes
(198.18.0.0/15), and removes everything it adds, on failure and Ctrl-C too.
"""
