"""The five configurations the bench compares, each set up on the lab's monitored veth
before a run and removed after it:

  untraced       nothing attached
  qdiscs         the thesis's qdiscs only: `ingress` + `htb` root 1:, no filter
  mirror-htb     the mirror (mirror.controller), htb layout
  mirror-clsact  the mirror, clsact layout (the default an operator would run)
  thesis         the thesis monitor reproduced (bench/bpf/thesis.c): ingress + htb
                 qdiscs, classic cls_bpf filters whose match runs an act_mirred
                 "egress mirror" action to a debug interface

The mirror and the thesis each get a debug interface built the same way
(mirror.debugif.ensure with the mirror's Sink: a veth pair whose far end drops at tc
ingress), so the clone's journey costs both the same."""
from __future__ import annotations

import logging
import threading

from pyroute2 import IPRoute

from mirror import debugif, tc
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


class Untraced(Config):
    key, label = "untraced", "untraced"


class QdiscsOnly(Config):
    key, label = "qdiscs", "qdiscs only (ingress + htb)"

    def setup(self, lab) -> None:
        self.ifindex = None
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=lab.host_if)[0]
            tc.add_qdisc(ipr, idx, "ingress")
            self.ifindex = idx
            tc.add_qdisc(ipr, idx, "htb")

    def teardown(self) -> None:
        if self.ifindex is None:
            return
        with IPRoute() as ipr:
            tc.del_qdisc(ipr, self.ifindex, "htb")
            tc.del_qdisc(ipr, self.ifindex, "ingress")
        self.ifindex = None


class Mirror(Config):
    """The mirror as an operator runs it: a Controller with its sweep loop running, trigger
    5xx, on the monitored veth; the compiled classifier is shared between runs (maps
    emptied before each) so that no run pays bcc's compile."""
    mirrors = bpf = True

    def __init__(self, shared, hook: str):
        super().__init__(shared)
        self.hook = hook
        self.key = f"mirror-{hook}"
        self.label = f"mirror ({hook})"
        self.ctl: Controller | None = None
        self.thread: threading.Thread | None = None

    def setup(self, lab) -> None:
        clf = self.shared.classifier
        clf.clear()
        self.debug_iface = unique_name("d")
        # No budgets: this configuration mirrors every packet of every error connection
        # (the completeness check counts on it).
        opts = Options(ifaces=[lab.host_if], debug_iface=self.debug_iface, hook=self.hook,
                       trigger="5xx", max_packets_per_flow=0, max_bytes_per_flow=0,
                       max_clones_per_second=0)
        self.ctl = Controller(opts, classifier_factory=lambda: clf,
                              sink_factory=lambda: self.shared.sink)
        logging.getLogger("mirror").setLevel(logging.WARNING)
        self.ctl.start()
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

    def prog_fds(self) -> dict[str, int]:
        clf = self.shared.classifier
        return {"ingress": clf.fd("ingress"), "egress": clf.fd("egress")}

    def sink_fd(self) -> int | None:
        return self.shared.sink.fd


class Thesis(Config):
    key, label = "thesis", "thesis monitor (reproduced)"
    mirrors = bpf = True

    def setup(self, lab) -> None:
        prog = self.shared.thesis
        prog.clear()
        self.ifindex = None
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
    """Programs compiled once per bench run."""

    def __init__(self):
        from mirror.bpfprog import Classifier, Sink

        from .progs import EmptyProgram, ThesisProgram
        self.classifier = Classifier()
        self.sink = Sink()
        self.thesis = ThesisProgram()
        self.empty = EmptyProgram()


def all_configs(shared) -> list[Config]:
    return [Untraced(shared), QdiscsOnly(shared), Mirror(shared, "htb"),
            Mirror(shared, "clsact"), Thesis(shared)]
