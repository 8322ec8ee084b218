"""`mirror cni install|uninstall` against real directories: the plugin copied whole, the
entry appended to the list the runtime reads and nothing else of it changed, a second run
a no-op, and what it must refuse (a directory reached through a link, a list that is not
JSON, a single plugin's configuration) refused in one line with nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from mirror.cli import build_parser

pytestmark = pytest.mark.unit

BRIDGE = {"cniVersion": "1.0.0", "name": "podnet", "disableCheck": True,
          "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True,
                       "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.231.0/24"}]]}},
                      {"type": "portmap", "capabilities": {"portMappings": True}},
                      {"type": "firewall"}]}


@pytest.fixture
def node(tmp_path):
    """A node's CNI directories (the binary one not made yet) and a plugin to copy."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    plugin = tmp_path / "tc-mirror-build"
    plugin.write_bytes(b"\x7fELF not really, but bytes to copy whole\n" * 100)
    return conf_dir, tmp_path / "bin", plugin


def write_list(path: Path, conf) -> Path:
    path.write_text(conf if isinstance(conf, str) else json.dumps(conf))
    path.chmod(0o644)
    return path


def cni(*args: str, env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    env.update(env_extra or {})
    return run_cli("cni", *args, env=env)


def install(node, *extra: str, env_extra=None):
    conf_dir, bin_dir, plugin = node
    return cni("install", "--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir),
               "--plugin", str(plugin), *extra, env_extra=env_extra)


def uninstall(node, *extra: str):
    conf_dir, bin_dir, _ = node
    return cni("uninstall", "--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir), *extra)


def identity(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def test_install_appends_the_entry_and_keeps_everything_else(node):
    conf_dir, bin_dir, plugin = node
    listfile = write_list(conf_dir / "10-podnet.conflist", BRIDGE)
    r = install(node, "--timeout", "2", env_extra={"MIRROR_STATE_DIR": "/run/test-state"})
    assert r.returncode == 0, r.stderr
    installed = bin_dir / "tc-mirror"
    assert installed.read_bytes() == plugin.read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o755
    after = json.loads(listfile.read_text())
    assert after == {**BRIDGE, "plugins": [*BRIDGE["plugins"],
                                           {"type": "tc-mirror", "stateDir": "/run/test-state",
                                            "timeoutSeconds": 2.0}]}
    assert list(after) == list(BRIDGE)                  # the keys in their order
    assert listfile.stat().st_mode & 0o777 == 0o644     # the runtime may read it as before
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-podnet.conflist"]  # no temp left


def test_install_twice_changes_nothing(node):
    conf_dir, bin_dir, _ = node
    listfile = write_list(conf_dir / "10-podnet.conflist", BRIDGE)
    assert install(node).returncode == 0
    before = identity(listfile), identity(bin_dir / "tc-mirror")
    r = install(node)
    assert r.returncode == 0, r.stderr
    assert "already chained" in r.stdout and "up to date" in r.stdout
    # Not even rewritten with the same bytes: a runtime may reload on any write.
    assert (identity(listfile), identity(bin_dir / "tc-mirror")) == before
    assert [p["type"] for p in json.loads(listfile.read_text())["plugins"]].count("tc-mirror") == 1


def test_an_older_entry_is_replaced_and_moved_last(node):
    conf_dir, _, _ = node
    old = {**BRIDGE, "plugins": [BRIDGE["plugins"][0], {"type": "tc-mirror", "stateDir": "/old"},
                                 *BRIDGE["plugins"][1:]]}
    listfile = write_list(conf_dir / "10-podnet.conflist", old)
    assert install(node).returncode == 0
    assert json.loads(listfile.read_text())["plugins"] == [*BRIDGE["plugins"],
                                                           {"type": "tc-mirror"}]


def test_the_first_file_by_name_is_chained_as_the_runtime_picks(node):
    conf_dir, _, _ = node
    first = write_list(conf_dir / "05-first.conflist", {**BRIDGE, "name": "first"})
    second = write_list(conf_dir / "10-podnet.conflist", BRIDGE)
    write_list(conf_dir / "00-notes.txt", "not a configuration")      # not the runtime's
    second_before = identity(second)
    assert install(node).returncode == 0
    assert json.loads(first.read_text())["plugins"][-1] == {"type": "tc-mirror"}
    assert identity(second) == second_before


def test_network_names_the_list(node):
    conf_dir, _, _ = node
    first = write_list(conf_dir / "05-first.conflist", {**BRIDGE, "name": "first"})
    first_before = identity(first)
    chosen = write_list(conf_dir / "10-podnet.conflist", BRIDGE)
    assert install(node, "--network", "podnet").returncode == 0
    assert json.loads(chosen.read_text())["plugins"][-1] == {"type": "tc-mirror"}
    assert identity(first) == first_before
    r = install(node, "--network", "nosuch")
    assert r.returncode == 2
    assert "no network named nosuch" in r.stderr and "first, podnet" in r.stderr


def test_a_symlinked_conf_dir_is_refused(node, tmp_path):
    conf_dir, bin_dir, _ = node
    listfile = write_list(conf_dir / "10-podnet.conflist", BRIDGE)
    before = identity(listfile)
    link = tmp_path / "linked-net.d"
    link.symlink_to(conf_dir)
    r = cni("install", "--conf-dir", str(link), "--bin-dir", str(bin_dir),
            "--plugin", str(node[2]))
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "symbolic link" in r.stderr and f"--conf-dir {conf_dir}" in r.stderr  # the fix
    assert identity(listfile) == before
    assert not bin_dir.exists()


def test_a_list_that_is_not_json_is_refused_unchanged(node):
    conf_dir, bin_dir, _ = node
    listfile = write_list(conf_dir / "10-podnet.conflist", json.dumps(BRIDGE)[:-7])
    before = identity(listfile)
    r = install(node)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "is not JSON" in r.stderr and "left it unchanged" in r.stderr
    assert identity(listfile) == before
    assert not bin_dir.exists()                        # nothing half done
    r = uninstall(node)                                # uninstall leaves it alone too
    assert r.returncode == 0, r.stderr
    assert "left" in r.stderr and identity(listfile) == before


def test_odd_lists_are_refused(node, tmp_path):
    conf_dir, _, _ = node
    single = write_list(conf_dir / "10-bridge.conf", BRIDGE["plugins"][0])
    r = install(node)
    assert r.returncode == 2 and "not a .conflist" in r.stderr, r.stderr
    single.unlink()
    real = write_list(tmp_path / "elsewhere.conflist", BRIDGE)
    (conf_dir / "10-podnet.conflist").symlink_to(real)
    before = identity(real)
    r = install(node)
    assert r.returncode == 2 and "is a symbolic link" in r.stderr, r.stderr
    assert identity(real) == before


def test_uninstall_removes_exactly_its_own(node):
    conf_dir, bin_dir, _ = node
    listfile = write_list(conf_dir / "10-podnet.conflist", BRIDGE)
    other = write_list(conf_dir / "20-other.conflist", {**BRIDGE, "name": "other"})
    assert install(node).returncode == 0
    assert install(node, "--network", "other").returncode == 0
    # One network left: the binary stays for the other, which still names it.
    r = uninstall(node, "--network", "podnet")
    assert r.returncode == 0, r.stderr
    assert json.loads(listfile.read_text()) == BRIDGE
    assert (bin_dir / "tc-mirror").exists() and "20-other.conflist still chains" in r.stdout
    r = uninstall(node)
    assert r.returncode == 0, r.stderr
    assert json.loads(other.read_text()) == {**BRIDGE, "name": "other"}
    assert not (bin_dir / "tc-mirror").exists()
    before = identity(listfile), identity(other)
    r = uninstall(node)                                # again: nothing to do, no write
    assert r.returncode == 0, r.stderr
    assert (identity(listfile), identity(other)) == before


def test_a_foreign_file_under_the_plugins_name_is_left_alone(node, tmp_path):
    conf_dir, bin_dir, _ = node
    write_list(conf_dir / "10-podnet.conflist", BRIDGE)
    bin_dir.mkdir()
    (bin_dir / "tc-mirror").symlink_to(tmp_path / "someone-elses")
    r = install(node)
    assert r.returncode == 2 and "not a plugin mirror installed" in r.stderr, r.stderr
    assert (bin_dir / "tc-mirror").is_symlink()
    assert "tc-mirror" not in (conf_dir / "10-podnet.conflist").read_text()


# --- the manifests ---------------------------------------------------------------------

K8S = Path(__file__).resolve().parent.parent / "container" / "k8s"


def pod_spec(path: Path) -> dict:
    doc = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "DaemonSet")
    return doc["spec"]["template"]["spec"]


def host_dirs(spec: dict, container: dict) -> dict:
    """mount path -> the node's directory, for a container of `spec`."""
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def test_the_daemonset_installs_and_the_uninstall_manifest_removes_the_same():
    install_spec = pod_spec(K8S / "daemonset.yaml")
    uninstall_spec = pod_spec(K8S / "uninstall" / "cni-uninstall.yaml")
    installer = next(c for c in install_spec["initContainers"] if c["name"] == "cni-install")
    remover = uninstall_spec["initContainers"][0]
    assert installer["args"][:2] == ["cni", "install"]
    assert remover["args"][:2] == ["cni", "uninstall"]
    assert installer["args"][2:] == remover["args"][2:]          # the same directories...
    assert host_dirs(install_spec, installer) == host_dirs(uninstall_spec, remover) == {
        "/host/opt/cni/bin": "/opt/cni/bin", "/host/etc/cni/net.d": "/etc/cni/net.d"}
    assert installer["image"] == remover["image"]                # ...by the same build
    for c in (installer, remover):
        args = build_parser().parse_args(c["args"])              # options that exist
        assert (args.bin_dir, args.conf_dir) == ("/host/opt/cni/bin", "/host/etc/cni/net.d")
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # Only the init container writes the node's CNI directories, not the controller.
    for c in install_spec["containers"]:
        assert not set(host_dirs(install_spec, c).values()) & {"/opt/cni/bin", "/etc/cni/net.d"}


@pytest.mark.parametrize("version", ["1.28.0", "1.33.0"])
def test_the_uninstall_manifest_validates_strictly(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    path = K8S / "uninstall" / "cni-uninstall.yaml"
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)
