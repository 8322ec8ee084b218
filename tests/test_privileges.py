"""mirror.privileges: reading the effective capability set and naming what is missing.
(The real processes, as root with capabilities dropped and as uid 65534, are in
test_lifecycle; the container with one capability left out is in test_container.)"""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT
from mirror import privileges


def status_file(tmp_path, cap_eff: str):
    path = tmp_path / "status"
    path.write_text(f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    return str(path)


@pytest.mark.unit
def test_effective_caps_decodes_the_mask(tmp_path):
    # bits 12 (NET_ADMIN), 38 (PERFMON), 39 (BPF)
    mask = f"{(1 << 12) | (1 << 38) | (1 << 39):016x}"
    assert privileges.effective_caps(status_file(tmp_path, mask)) == {
        "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_BPF"}
    assert privileges.effective_caps(status_file(tmp_path, "0" * 16)) == set()
    assert "cap_45" in privileges.effective_caps(status_file(tmp_path, f"{1 << 45:016x}"))


@pytest.mark.unit
def test_bit_numbers_match_the_kernel_headers():
    """Against capsh, which has its own table (libcap): `capsh --decode` of each bit."""
    for name, bit in privileges.CAP_BITS.items():
        out = subprocess.run(["capsh", f"--decode={1 << bit:x}"], capture_output=True,
                             text=True, check=True).stdout
        assert out.strip().endswith(name.lower()), (name, out)


@pytest.mark.unit
@pytest.mark.parametrize("release,has", [("6.18.44-fc-v657", True), ("5.8.0", True),
                                         ("5.7.19-custom", False), ("4.19.0-21-amd64", False),
                                         ("5.10.0-28-amd64", True)])
def test_cap_bpf_from_kernel_release(release, has):
    assert privileges.kernel_has_cap_bpf(release) is has
    expected = privileges.CONTROLLER_CAPS if has else privileges.CONTROLLER_CAPS_BEFORE_5_8
    assert privileges.required_caps(release) == expected


@pytest.mark.unit
def test_missing_caps_counts_sys_admin_for_bpf_and_perfmon():
    needed = privileges.CONTROLLER_CAPS
    assert privileges.missing_caps(needed, {"CAP_NET_ADMIN"}) == ["CAP_BPF", "CAP_PERFMON"]
    assert privileges.missing_caps(needed, {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}) == []
    assert privileges.missing_caps(needed, {"CAP_SYS_ADMIN"}) == ["CAP_NET_ADMIN"]


@pytest.mark.testrun
def test_this_process_as_root_has_what_it_needs():
    """The suite runs as root with the controller's capabilities: no error, and bpf(2) is
    not refused (the probe map is created and closed)."""
    privileges.require("the test")
    assert privileges.bpf_syscall_refused() is False


@pytest.mark.testrun
def test_setpriv_dropped_process_sees_its_own_set():
    code = "from mirror import privileges; print(sorted(privileges.effective_caps()))"
    out = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_admin,+bpf",
                          sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "['CAP_BPF', 'CAP_NET_ADMIN']"
