"""The package as a user installs it: a wheel built from this tree, installed into a fresh
virtualenv outside the checkout, runs `mirror run` (the classifier's C sources travel
inside the wheel; no MIRROR_BPF_DIR, no checkout on the path)."""
from __future__ import annotations

import os
import selectors
import shutil
import site
import subprocess
import sys
import sysconfig
import time

import pytest

from helpers import ROOT
from mirror.lab.netns import stop_process, unique_name

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtualenv with only the wheel installed in it. Its dependencies (pyroute2,
    prometheus-client, dpkt) are taken from the test's own environment through a .pth
    line, so that the test needs no package index; that directory's own .pth files (the
    editable install of the checkout among them) are not processed from there."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the wheel is made of: a build leaves build/ and
    # mirror.egg-info behind in its source tree. Nothing of the checkout is on the path
    # of what runs below (pip would take that egg-info for an installed mirror).
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("mirror", "bpf"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    env = clean_env()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(tmp / "dist"), str(src)], capture_output=True, text=True,
                           timeout=600, cwd=tmp, env=env)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp / "dist").glob("mirror-*.whl"))
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120, cwd=tmp, env=env)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300, cwd=tmp, env=env)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], capture_output=True, text=True,
                             check=True, cwd=tmp, env=env).stdout.strip()
    ours = sysconfig.get_path("purelib")
    (tmp / "venv" / purelib.split(str(venv) + "/", 1)[1] / "deps.pth").write_text(
        "\n".join([ours, *site.getsitepackages()]) + "\n")
    return venv


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MIRROR_BPF_DIR", "PYTHONPATH")}


def test_wheel_runs_outside_the_checkout(installed, host, state_dir, tmp_path):
    env = clean_env()
    where = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import mirror.abi as a; print(a.__file__); print(a.bpf_dir())"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    module, bpf = where.stdout.split()
    assert module.startswith(str(installed)) and bpf.startswith(str(installed))
    assert not bpf.startswith(str(ROOT))
    proc = subprocess.Popen([str(installed / "bin" / "mirror"), "run", "--iface",
                             host.host_if, "--debug-iface", unique_name("d")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env=env)
    try:
        out = read_until(proc, "mirror: ready")
        assert f"{host.host_if}: attached" in out
    finally:
        stop_process(proc, timeout=30)
    assert proc.returncode == 0


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """What the process printed up to the line holding `marker`; AssertionError with all
    of it when the process exits or the time is up first."""
    out, sel = b"", selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while marker.encode() not in out:
        if time.monotonic() > deadline or (not sel.select(1) and proc.poll() is not None):
            raise AssertionError(f"no {marker!r} line; it printed:\n{out.decode()}")
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {marker!r}:\n"
                                 f"{out.decode()}")
        out += chunk
    return out.decode()
