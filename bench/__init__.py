"""The bench suite: what the mirror costs an operator's traffic, side by side with no
monitor and with the original thesis monitor (thesis chapters 4.2 and 5).

Topology (bench/lab.py): nginx (one worker, /ok 200 and /error 500 of equal length) and
`iperf3 -s` in a server network namespace; clients in the root namespace; the host-side
veth is monitored. Client and server are pinned to one CPU each.

Configurations (bench/configs.py), interleaved round by round within every workload:
untraced; qdiscs only (ingress + htb); the mirror with the htb layout; the mirror with the
clsact layout; the thesis monitor reproduced (bench/bpf/thesis.c, act_mirred).

Measures (bench/runner.py):
  - iperf3 TCP throughput, offloads on and off;
  - h2load HTTP/1.1 requests/s and latency (mean, p50, p90, p99, log2 distribution) at
    0, 25, 50, 75, 100 % error requests, with mirror completeness checked in every run
    (bench/completeness.py);
  - per-packet cost through BPF_PROG_TEST_RUN against an empty classifier
    (bench/microbench.py);
  - in-traffic cost: program run-time statistics during h2load runs.
Reports (bench/report.py, bench/plots.py): bench/results/<timestamp>.{json,md,png} and
latest.{json,md}, targets printed as met or not met.

OVERHEAD: the bench saturates both CPUs for its whole run (about 20 minutes in full mode,
about a minute with --quick); run it on a machine with nothing else to do, or read its
numbers as ratios under load. It only sends traffic between the namespaces it makes
(198.18.0.0/15), and removes everything it adds, on failure and Ctrl-C too.
"""
