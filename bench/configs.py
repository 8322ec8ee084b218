"""The configurations the bench compares, each set up on the lab's monitored veth before a
run and removed after it:

  untraced       nothing attached
  qdiscs         the thesis's qdiscs only: `ingress` + `htb` root 1:, no filter
  empty-clsact   the mirror's default layout with nothing in it: `clsact`, a classifier
                 that returns at once (bench/bpf/empty.c) at ingress and egress, as the
                 mirror's filters sit: the floor any classifier on this hook costs
  tcpdump-w      `tcpdump -w` of the whole monitored interface: what an operator does
                 without this tool
  mirror-clsact  the mirror as an operator runs it by default: clsact layout, request
                 snapshot (512 bytes), HTTP/2 parser, default budgets
  mirror-tcx     the same on tcx links
  mirror-htb     the same in the design card's ingress + htb layout
  mirror-nosnap  mirror-clsact with the request snapshot off (--request-bytes 0)
  mirror-noh2    mirror-clsact with the HTTP/2 parser compiled out
  mirror-nobudget mirror-clsact with no budgets and no event limits: every packet of
                 every error connection cloned, as the thesis does, and every error
                 response an event (the error storm without bounds)
  mirror-decide  mirror-nobudget with its debug interface unset: it decides and marks
                 but never clones (in-traffic pass only: the clone's share, apart)
  mirror-decide-bounded  mirror-clsact with its debug interface unset: the decision path
                 as shipped, where the default event bounds, not every error response,
                 decide how many events the kernel writes (in-traffic pass only)
  thesis         the thesis monitor reproduced (bench/bpf/thesis.c): ingress + htb
                 qdiscs, classic cls_bpf filters whose match runs an act_mirred
                 "egress mirror" action to a debug interface

With --candidate DIR each mirror configuration of the run but mirror-noh2 has a twin,
KEY@candidate, the same configuration with the classifier compiled from DIR's sources (a
patched copy of bpf/): both run in every round, in random order among the others, so a
change to the classifier is judged by ratios paired by round rather than between two runs
(the unchanged thesis's figure at 100 % errors was 232, 259 and 213 ns in three such runs
minutes apart, docs/bench.md).

The mirror and the thesis each get a debug interface built the same way
(mirror.debugif.ensure with the mirror's Sink: a veth pair whose far end drops at tc
ingress), so the clone's journey costs both the same."""
from __future__ import annotations

import logging
import threading

from pyroute2 import IPRoute

from mirror import debugif
from mirror.abi import DEFAULT_REQUEST_BYTES
from mirror.errors import UsageError
from mirror.hooks import tc
from mirror.controller import Controller, Options
from mirror.lab.netns import unique_name

THESIS_HANDLE = 1           # the thesis's handle ':1'
THESIS_PRIO = 1
THESIS_NAME = "thesis-monitor"


class Config:
    key = ""
    label = ""
    mirrors = False          # whether error connections should appear on a debug interface
    bpf = False              # whether a classifier runs (in-traffic cost is measured)
    budgeted = False         # clones capped per flow: completeness counts flows, not packets
    reads_h2 = False         # whether it can find an error in h2c traffic

    def __init__(self, shared):
        self.shared = shared     # compiled programs, loaded once per bench run
        self.debug_iface: str | None = None

    def setup(self, lab) -> None:
        pass

    def teardown(self) -> None:
        pass

    def prog_fds(self) -> dict[str, int]:
        """Programs whose run-time statistics make up this configuration's in-traffic cost."""
        return {}

    def sink_fd(self) -> int | None:
        return None

    def counters(self) -> dict[str, int] | None:
        """The classifier's counters, for the run's deltas (None: no classifier)."""
        return None


class Untraced(Config):
    key, label = "untraced", "untraced"


class _OnQdiscs(Config):
    """Qdiscs of `kinds` added to the monitored interface in order (then whatever
    `fill` puts in them), removed in reverse after the run; their filters go with them.
    Only the qdiscs this setup created are removed."""
    kinds: tuple[str, ...] = ()
    ifindex: int | None = None  # teardown may follow a setup interrupted before it starts

    def setup(self, lab) -> None:
        self.ifindex, self.created = None, []
        with IPRoute() as ipr:
            self.ifindex = ipr.link_lookup(ifname=lab.host_if)[0]
            for kind in self.kinds:
                tc.add_qdisc(ipr, self.ifindex, kind)
                self.created.append(kind)
            self.fill(ipr, self.ifindex)

    def fill(self, ipr, ifindex: int) -> None:
        pass

    def teardown(self) -> None:
        if self.ifindex is None:
            return
        with IPRoute() as ipr:
            for kind in reversed(self.created):
                tc.del_qdisc(ipr, self.ifindex, kind)
        self.ifindex, self.created = None, []


class QdiscsOnly(_OnQdiscs):
    key, label = "qdiscs", "qdiscs only (ingress + htb)"
    kinds = ("ingress", "htb")


class EmptyClsact(_OnQdiscs):
    """What the hook itself costs before the classifier does anything: the mirror's
    clsact layout (its filter's handle, priority and direct action, mirror.hooks.tc) with
    the empty program at both hooks. A target on the mirror's cost over untraced can be
    met only above this floor."""
    key, label = "empty-clsact", "empty classifier (clsact)"
    kinds = ("clsact",)

    def fill(self, ipr, ifindex: int) -> None:
        for parent, direction in ((tc.CLSACT_INGRESS, "ingress"),
                                  (tc.CLSACT_EGRESS, "egress")):
            tc.replace_filter(ipr, ifindex, parent, self.shared.empty.fd, direction)


class TcpdumpWrite(Config):
    """`tcpdump -i IFACE -w FILE`, as an operator types it (default snap length and
    buffering), into a file on the root filesystem, deleted after the run."""
    key, label = "tcpdump-w", "tcpdump -w (whole interface)"

    def setup(self, lab) -> None:
        import tempfile

        from mirror.capture.tcpdump import Tcpdump
        self.dir = self.tcpdump = None      # this run's, whatever a previous one left
        self.dir = tempfile.TemporaryDirectory(prefix="bench-tcpdump-w-", dir="/var/tmp")
        self.tcpdump = Tcpdump(lab.host_if, f"{self.dir.name}/all.pcap")
        self.tcpdump.cmd = ["tcpdump", "-n", "-i", lab.host_if, "-w", self.tcpdump.path]
        self.tcpdump.start()

    def teardown(self) -> None:
        # Either may be missing: a SIGTERM can interrupt setup anywhere.
        try:
            if getattr(self, "tcpdump", None) is not None:
                self.tcpdump.stop()
        finally:
            if getattr(self, "dir", None) is not None:
                self.dir.cleanup()
            self.dir = self.tcpdump = None


class Mirror(Config):
    """The mirror as an operator runs it: a Controller with its sweep loop running, trigger
    5xx, on the monitored veth; the compiled classifier is shared between runs (maps
    emptied before each) so that no run pays bcc's compile. The variants switch one
    feature of this round off: the request snapshot, the HTTP/2 parser (a second
    classifier compiled without it), the budgets, the clone."""
    mirrors = bpf = True

    def __init__(self, shared, hook: str = "clsact", variant: str = "",
                 candidate: bool = False):
        super().__init__(shared)
        self.hook, self.variant, self.candidate = hook, variant, candidate
        self.key = f"mirror-{variant or hook}" + (CANDIDATE if candidate else "")
        self.label = {"": f"mirror ({hook})", "nosnap": "mirror, request snapshot off",
                      "noh2": "mirror, HTTP/2 parser off",
                      "nobudget": "mirror, no budgets",
                      "decide": "mirror, no budgets, clone off",
                      "decide-bounded": "mirror, defaults, clone off"}[variant] + \
            (" [candidate]" if candidate else "")
        self.budgeted = variant not in ("nobudget", "decide")
        self.reads_h2 = variant != "noh2"
        self.mirrors = variant not in ("decide", "decide-bounded")
        self.ctl: Controller | None = None
        self.thread: threading.Thread | None = None

    def classifier(self):
        if self.candidate:
            return self.shared.classifier_candidate
        return self.shared.classifier_noh2 if self.variant == "noh2" else \
            self.shared.classifier

    def setup(self, lab) -> None:
        clf = self.classifier()
        clf.clear()
        request_bytes = 0 if self.variant == "nosnap" else DEFAULT_REQUEST_BYTES
        clf.set_request_bytes(request_bytes)
        self.debug_iface = unique_name("d")
        budgets = {} if self.budgeted else {
            "max_packets_per_flow": 0, "max_bytes_per_flow": 0, "max_clones_per_second": 0,
            "max_events_per_second": 0, "max_events_per_connection": 0}
        opts = Options(ifaces=[lab.host_if], debug_iface=self.debug_iface, hook=self.hook,
                       trigger="5xx", request_bytes=request_bytes, **budgets)
        self.ctl = Controller(opts, classifier_factory=lambda: clf,
                              sink_factory=lambda: self.shared.sink)
        logging.getLogger("mirror").setLevel(logging.WARNING)
        self.ctl.start()
        if not self.mirrors:
            clf.set_debug_ifindex(0)        # marks flows, clones nothing
        self.thread = threading.Thread(target=self.ctl.run, name="mirror-controller",
                                       daemon=True)
        self.thread.start()

    def teardown(self) -> None:
        if self.ctl is None:
            return
        self.ctl.stop_event.set()
        if self.thread:
            self.thread.join(10)
        try:
            self.ctl.close()
        finally:
            self.ctl = self.thread = None

    def counters(self) -> dict[str, int]:
        return self.classifier().counters()

    def prog_fds(self) -> dict[str, int]:
        clf = self.classifier()
        return {"ingress": clf.fd("ingress"), "egress": clf.fd("egress")}

    def sink_fd(self) -> int | None:
        return self.shared.sink.fd


class Thesis(Config):
    key, label = "thesis", "thesis monitor (reproduced)"
    mirrors = bpf = True
    reads_h2 = False

    def setup(self, lab) -> None:
        prog = self.shared.thesis
        prog.clear()
        self.ifindex = self.debug_iface = None
        self.created = []
        self.ipr = IPRoute()
        self.debug_iface = unique_name("d")
        dbg = debugif.ensure(self.ipr, self.debug_iface, lambda: self.shared.sink.fd)
        self.ifindex = self.ipr.link_lookup(ifname=lab.host_if)[0]
        action = [{"kind": "mirred", "direction": "egress", "action": "mirror",
                   "ifindex": dbg.ifindex}]
        for kind, parent in (("ingress", tc.INGRESS_HANDLE), ("htb", tc.HTB_HANDLE)):
            tc.add_qdisc(self.ipr, self.ifindex, kind)
            self.created.append(kind)
            self.ipr.tc("add-filter", "bpf", self.ifindex, handle=THESIS_HANDLE, fd=prog.fd,
                        name=THESIS_NAME, parent=parent, prio=THESIS_PRIO,
                        protocol=tc.ETH_P_ALL, action=action)

    def teardown(self) -> None:
        if getattr(self, "ipr", None) is None:
            return
        try:
            for kind in reversed(self.created):      # the filters go with their qdisc
                tc.del_qdisc(self.ipr, self.ifindex, kind)
            if self.debug_iface:
                debugif.remove(self.ipr, self.debug_iface)
        finally:
            self.ipr.close()
            self.ipr = None

    def prog_fds(self) -> dict[str, int]:
        return {"both": self.shared.thesis.fd}

    def sink_fd(self) -> int | None:
        return self.shared.sink.fd


class Shared:
    """Programs compiled once per bench run; `candidate_dir`: the candidate classifier's
    sources (--candidate), compiled at once so that a candidate that does not compile or
    breaks the contract of mirror.abi stops the bench before its first run."""

    def __init__(self, candidate_dir=None):
        from mirror.bpfprog import Classifier, Sink

        from .progs import EmptyProgram, ThesisProgram
        self.classifier = Classifier()
        self.classifier_candidate = None
        if candidate_dir:
            try:
                self.classifier_candidate = Classifier(src_dir=candidate_dir)
            except UsageError as exc:   # its layouts are not mirror.abi's
                raise UsageError(f"the candidate classifier in {candidate_dir}: {exc}") \
                    from exc
            except Exception as exc:    # bcc's compile or load error: its output went to stderr
                raise UsageError(f"the candidate classifier in {candidate_dir} did not "
                                 f"compile or load ({exc}); see the messages above") from exc
        self._noh2 = None
        self.sink = Sink()
        self.thesis = ThesisProgram()
        self.empty = EmptyProgram()

    @property
    def classifier_noh2(self):
        if self._noh2 is None:
            from mirror.bpfprog import Classifier
            self._noh2 = Classifier(http2=False)
        return self._noh2


KEYS = ("untraced", "qdiscs", "empty-clsact", "tcpdump-w", "mirror-clsact", "mirror-tcx",
        "mirror-htb", "mirror-nosnap", "mirror-noh2", "mirror-nobudget", "mirror-decide",
        "mirror-decide-bounded", "thesis")


CANDIDATE = "@candidate"


def with_candidates(shared, configs: dict[str, Config]) -> dict[str, Config]:
    """`configs` and, when the bench has a candidate classifier, each mirror
    configuration's twin compiled from it (KEY@candidate; none for mirror-noh2, compiled
    without the parser: its twin would need a third classifier)."""
    out = dict(configs)
    if shared.classifier_candidate is None:
        return out
    for key, cfg in configs.items():
        if isinstance(cfg, Mirror) and cfg.variant != "noh2":
            twin = Mirror(shared, cfg.hook, cfg.variant, candidate=True)
            out[twin.key] = twin
    return out


def all_configs(shared) -> dict[str, Config]:
    cfgs = [Untraced(shared), QdiscsOnly(shared), EmptyClsact(shared), TcpdumpWrite(shared),
            Mirror(shared, "clsact"), Mirror(shared, "tcx"), Mirror(shared, "htb"),
            Mirror(shared, variant="nosnap"), Mirror(shared, variant="noh2"),
            Mirror(shared, variant="nobudget"), Mirror(shared, variant="decide"),
            Mirror(shared, variant="decide-bounded"), Thesis(shared)]
    assert tuple(c.key for c in cfgs) == KEYS
    return {c.key: c for c in cfgs}
