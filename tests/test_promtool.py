"""Prometheus's own tools on what the project exposes and ships (Debian's `prometheus`
package gives promtool; scripts/setup installs it and keeps its server stopped).

- `promtool check metrics` has nothing to say about the controller's and the capture
  sidecar's endpoints, scraped from real processes after error and good traffic.
- container/prometheus/alerts.yaml passes `promtool check rules`, and its unit tests
  (tests/alerts_test.yaml) pass `promtool test rules`."""
from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from helpers import MirrorProcess, env_with
from mirror.lab.client import send
from mirror.lab.netns import unique_name
from test_capture import capture_proc  # noqa: F401 (the fixture)
from test_metrics import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "container" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "tests" / "alerts_test.yaml"


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing: run scripts/setup (Debian's prometheus package)")
    return path


def check_metrics(promtool: str, text: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=30)


def fetch(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read()


@pytest.mark.unit
def test_promtool_lints_for_real(promtool):
    """The check below means something: promtool does object to a badly named counter
    and to a metric without help."""
    bad = (b"# HELP mirror_things A counter without its suffix\n# TYPE mirror_things counter\n"
           b"mirror_things 3\n# TYPE mirror_nohelp gauge\nmirror_nohelp 1\n")
    r = check_metrics(promtool, bad)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode != 0 and 'should have "_total" suffix' in out and "no help" in out, out


@pytest.mark.kernel
def test_endpoints_pass_promtool_check_metrics(promtool, host, nginx, tmp_path, capture_proc):
    debug = unique_name("d")
    ctl_port, cap_port = free_port(), free_port()
    cap = capture_proc(debug, tmp_path / "cap", "--metrics-addr", f"127.0.0.1:{cap_port}")
    mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", debug,
                           "--metrics-addr", f"127.0.0.1:{ctl_port}",
                           env=env_with(MIRROR_STATE_DIR=tmp_path / "state"))
    mirror.start()
    try:
        assert cap.wait_state("capturing"), cap.stop_output()
        for paths in (["/error"], ["/ok"], ["/ok", "/error"]):
            send(host.ns_v4, host.host_v4, paths)
        endpoints = {"controller": fetch(ctl_port), "capture": fetch(cap_port)}
    finally:
        assert cap.stop() == 0, cap.output
        assert mirror.stop() == 0, mirror.output
    assert b"mirror_flows_marked_total 2.0" in endpoints["controller"]
    assert b"mirror_capture_up 1.0" in endpoints["capture"]
    for name, text in endpoints.items():
        r = check_metrics(promtool, text)
        assert (r.returncode, r.stdout + r.stderr) == (0, b""), (name, r.stdout + r.stderr)


@pytest.mark.unit
def test_alert_rules_pass_check_and_unit_tests(promtool):
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 9 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@pytest.mark.unit
def test_rules_cover_what_the_issue_asks():
    """Error response rate, clone failures, lost events, capture drops, controller errors,
    each on the metric that counts it."""
    import yaml
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]}
    wanted = {"MirrorHTTPErrorRateHigh": 'mirror_http_responses_total{class="5xx"}',
              "MirrorCloneFailures": "mirror_clone_failures_total",
              "MirrorEventsLost": "mirror_events_lost_total",
              "MirrorCaptureDrops": "mirror_capture_packets_dropped_total",
              "MirrorControllerErrors": "mirror_controller_errors_total",
              "MirrorControllerGone": "mirror_interfaces_attached"}
    for alert, metric in wanted.items():
        assert metric in rules[alert], (alert, rules.get(alert))
    assert "by (job, instance, stage)" in rules["MirrorControllerErrors"]


@pytest.mark.unit
def test_the_next_commands_of_the_alerts_are_commands_of_this_tool():
    """The commands the error-rate alert names (as promtool renders them in
    tests/alerts_test.yaml, which checks the rendering) are read by `mirror`'s own parser:
    an option renamed here breaks this test, not an operator's night."""
    import shlex

    import yaml
    from mirror.cli import build_parser
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    commands = [alert["exp_annotations"][name] for t in tests
                for case in t.get("alert_rule_test", [])
                if case["alertname"] == "MirrorHTTPErrorRateHigh"
                for alert in case.get("exp_alerts", [])
                for name in ("next_command", "capture_command")]
    assert len(commands) == 4, commands
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "mirror", command
        args = build_parser().parse_args(words[1:])
        assert args.command in ("events", "capture"), command
        assert args.since == "15m" and args.status == "5xx", command
