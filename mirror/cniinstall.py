"""`mirror cni install|uninstall`: the chained CNI plugin (cni/tc-mirror) put into a node's
CNI binary directory and appended to a network's configuration list, and taken out again.

What a runtime reads must never be half written: the binary and the list are each written
whole beside the old one and renamed over it (mirror.safepath.write_atomic, synced, as they
outlive a reboot). A list is rewritten only when its content changes (a runtime may reload
on any write), and only when it is what it looks like: a regular file holding a JSON object
with a `plugins` list, in a directory reached without a symbolic link, that only root can
change. Anything else is refused with one line that says what to fix, and nothing is
written. Of a list, only the entries of type tc-mirror are this tool's: every other key and
plugin is kept as it was, in its order."""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from .cliutil import checked
from .config import parse_seconds
from .errors import UsageError
from .safepath import UnsafePath, check_directory, check_file, write_atomic

PLUGIN = "tc-mirror"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
# What the runtimes load from a configuration directory (libcni's ConfFiles, as containerd
# and CRI-O call it): the first of these by name, when no network is named.
CONF_SUFFIXES = (".conf", ".conflist", ".json")
# Rereads of a list changed by someone else between our read and our rename.
ATTEMPTS = 5
# The plugin takes timeoutSeconds in (0, 60] and falls back to its default otherwise.
MAX_TIMEOUT = 60.0
RAW = argparse.RawDescriptionHelpFormatter     # the epilog's examples keep their lines

EPILOG = """\
examples:
  mirror cni install --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d
  mirror cni install --conf-dir /etc/cni/net.d --network NAME     # a podman CNI network
  mirror cni uninstall --conf-dir /etc/cni/net.d --network NAME

install copies the plugin into --bin-dir and appends {"type": "tc-mirror"} to the
plugins of one configuration list: the one named --network, else the first file by name
in --conf-dir (the one the kubelet's runtime uses). Run again, it changes nothing.
uninstall removes the tc-mirror entries (of --network's list, else of every list in
--conf-dir) and then the binary, once no list in --conf-dir chains it any more.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("cni", help="install the chained CNI plugin into a node's CNI "
                       "directories, or remove it",
                       description="Put the chained CNI plugin (tc-mirror: the hooks are in "
                       "place before a new container's first packet) into a node's CNI "
                       "binary directory and a network's configuration list, or take it out.",
                       epilog=EPILOG, formatter_class=RAW)
    actions = p.add_subparsers(dest="cni_action", metavar="ACTION", required=True)
    ins = actions.add_parser("install", help="copy the plugin and chain it (idempotent)",
                             epilog=EPILOG, formatter_class=RAW)
    _common(ins)
    ins.add_argument("--plugin", metavar="FILE",
                     help="the plugin binary to copy (default: MIRROR_CNI_PLUGIN, which the "
                     "image sets, else the checkout's build/cni/tc-mirror made by cni/build)")
    ins.add_argument("--state-dir", metavar="DIR",
                     help="the controllers' state directory, written into the entry as "
                     "stateDir (default: MIRROR_STATE_DIR when set, else left to the "
                     "plugin's default /run/tc-mirror)")
    ins.add_argument("--timeout", type=checked(_timeout), metavar="SECONDS",
                     help="how long an ADD waits for the controllers' answer, written as "
                     "timeoutSeconds, at most 60 (default: left to the plugin's 3)")
    ins.set_defaults(func=cmd_install)
    un = actions.add_parser("uninstall", help="remove the plugin's entries, then its binary",
                            epilog=EPILOG, formatter_class=RAW)
    _common(un)
    un.set_defaults(func=cmd_uninstall)


def _timeout(text: str) -> float:
    seconds = parse_seconds(text)
    if seconds > MAX_TIMEOUT:
        raise ValueError(f"at most {MAX_TIMEOUT:g} seconds (a container's start waits that "
                         f"long at worst), got {text!r}")
    return seconds


def _common(p) -> None:
    p.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, metavar="DIR",
                   help="the node's CNI binary directory (default %(default)s; created if "
                   "missing)")
    p.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, metavar="DIR",
                   help="the node's CNI configuration directory (default %(default)s)")
    p.add_argument("--network", metavar="NAME",
                   help="the network (the `name` of a configuration list) to chain into "
                   "(default: the first configuration file by name)")


def default_plugin() -> Path:
    env = os.environ.get("MIRROR_CNI_PLUGIN")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "build" / "cni" / PLUGIN


# --- the directories ------------------------------------------------------------------

def safe_directory(path: str, option: str, create: bool = False) -> Path:
    """`path` as given, when it is a directory reached without a symbolic link, in
    directories only root (or the running user) can change. A link is refused rather than
    followed: what the runtime reads is what is written, and the fix is to name the target."""
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(given))
    if real != given:
        raise UsageError(f"{option} {path} is reached through a symbolic link: give "
                         f"{option} {real}, the directory itself")
    try:
        check_directory(given)
    except UnsafePath as exc:
        raise UsageError(f"{option}: {exc}; mirror writes there as root: make it and the "
                         "directories above it root's, writable by nobody else") from None
    if not given.exists():
        if not create:
            raise UsageError(f"{option} {path} does not exist: give the directory the "
                             "runtime reads (on a node, mounted from the host)")
        os.makedirs(given, mode=0o755, exist_ok=True)
    if not given.is_dir():
        raise UsageError(f"{option} {path} is not a directory")
    return given


# --- the configuration lists ----------------------------------------------------------

@dataclass
class ConfList:
    """A configuration file as read: its JSON (None when it is not JSON, `error` saying
    why), its mode, and its identity when read, to notice a writer that replaced it
    before our rename."""
    path: Path
    conf: dict | None
    error: str
    identity: tuple
    mode: int

    @property
    def name(self):
        return self.conf.get("name") if isinstance(self.conf, dict) else None


def conf_files(conf_dir: Path) -> list[Path]:
    """The configuration files a runtime considers, in the order it does (by name)."""
    return sorted((p for p in conf_dir.iterdir()
                   if p.name.endswith(CONF_SUFFIXES) and not p.is_dir()), key=lambda p: p.name)


def read_conf(path: Path) -> ConfList:
    """The file read without following a link; `conf` None and `error` saying why when it
    is not JSON. UsageError when it is not a file this tool would replace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise UsageError(f"{path} is a symbolic link: the runtime would read the file it "
                             "points to; chain the plugin there by hand, or replace the link "
                             "with that file") from None
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            check_file(st, str(path))
        except UnsafePath as exc:
            raise UsageError(f"{exc}: mirror replaces only a regular file that root alone can "
                             "change; fix it, or chain the plugin by hand") from None
        raw = f.read()
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        conf = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return ConfList(path, None, f"not JSON ({exc})", identity, stat.S_IMODE(st.st_mode))
    return ConfList(path, conf, "", identity, stat.S_IMODE(st.st_mode))


def chainable(cl: ConfList) -> None:
    """UsageError unless the runtime reads `cl` as a list a plugin can be chained into."""
    if cl.conf is None:
        raise UsageError(f"{cl.path} is {cl.error}: mirror left it unchanged; fix it (the "
                         "runtime cannot read it either)")
    if not cl.path.name.endswith(".conflist") or not isinstance(cl.conf, dict) or \
            not isinstance(cl.conf.get("plugins"), list):
        raise UsageError(f"{cl.path} is a single plugin's configuration, not a .conflist "
                         "with a plugins list: the runtime chains nothing after it; make it "
                         "a .conflist (its plugin as the first of \"plugins\")")


def choose(conf_dir: Path, network: str | None) -> ConfList:
    """The list to chain into: the one named `network`, else the first file by name (the
    runtime's choice; an unreadable first file is refused, not skipped, since the runtime
    would not skip it either)."""
    files = conf_files(conf_dir)
    if not files:
        raise UsageError(f"no CNI network configuration in {conf_dir} yet: the network "
                         "plugin writes one when it starts; run this again after it")
    if network is None:
        cl = read_conf(files[0])
        chainable(cl)
        return cl
    names = {path: peek_name(path) for path in files}
    for path, name in names.items():
        if name == network:
            cl = read_conf(path)        # strictly, now that it is the one to edit
            chainable(cl)
            return cl
    known = sorted({str(n) for n in names.values() if n is not None})
    unnamed = [p.name for p, n in names.items() if n is None]
    also = f"; without a name or not JSON: {', '.join(unnamed)}" if unnamed else ""
    raise UsageError(f"no network named {network} in {conf_dir} (networks there: "
                     f"{', '.join(known) or 'none'}{also})")


def peek_name(path: Path):
    """The network name a file holds, or None: only to find the file, which is then read
    strictly."""
    try:
        conf = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return conf.get("name") if isinstance(conf, dict) else None


def is_ours(plugin) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN


def with_entry(conf: dict, entry: dict) -> dict:
    """`conf` with `entry` as the last plugin and no other of ours."""
    plugins = [p for p in conf["plugins"] if not is_ours(p)] + [entry]
    return {**conf, "plugins": plugins}


def without_entry(conf: dict) -> dict:
    return {**conf, "plugins": [p for p in conf["plugins"] if not is_ours(p)]}


def rewrite(cl: ConfList, edit) -> bool:
    """Applies `edit` (conf -> conf) and writes the result over the file when it differs.
    A file changed by someone else since it was read is read again and edited again, so
    that their change is kept. False when there was nothing to change."""
    for _ in range(ATTEMPTS):
        new = edit(cl.conf)
        if new == cl.conf:
            return False
        now = read_conf(cl.path)
        if now.identity == cl.identity:
            data = (json.dumps(new, indent=2) + "\n").encode()
            write_atomic(cl.path, data, mode=cl.mode, durable=True)
            return True
        chainable(now)
        cl = now
    raise UsageError(f"{cl.path} kept changing while mirror edited it: run this again once "
                     "whatever writes it has settled")


# --- the binary -----------------------------------------------------------------------

def install_binary(source: Path, bin_dir: Path) -> bool:
    """Copies the plugin into `bin_dir` unless the same bytes are there. False when they
    were."""
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"the plugin {source} is missing: run cni/build, or give --plugin "
                         "(or MIRROR_CNI_PLUGIN)") from None
    target = bin_dir / PLUGIN
    current = existing_binary(target)
    if current is not None and current.read_bytes() == data:
        return False
    write_atomic(target, data, mode=0o755, durable=True)
    return True


def existing_binary(target: Path) -> Path | None:
    """`target` when it is there, as a regular file root alone can change; UsageError when
    something else has the name (another tool's link, a directory): not ours to replace."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    try:
        check_file(st, str(target))
    except UnsafePath as exc:
        raise UsageError(f"{exc}: not a plugin mirror installed; remove it, or give "
                         "another --bin-dir") from None
    return target


# --- the commands ---------------------------------------------------------------------

def say(text: str) -> None:
    print(f"mirror: {text}", flush=True)


def entry_of(args) -> dict:
    entry: dict = {"type": PLUGIN}
    state_dir = args.state_dir or os.environ.get("MIRROR_STATE_DIR")
    if state_dir:
        entry["stateDir"] = os.path.abspath(state_dir)
    if args.timeout is not None:
        entry["timeoutSeconds"] = args.timeout
    return entry


def cmd_install(args) -> int:
    conf_dir = safe_directory(args.conf_dir, "--conf-dir")
    # The list is checked before anything is made or copied: a refused list leaves the
    # node as it was.
    cl = choose(conf_dir, args.network)
    bin_dir = safe_directory(args.bin_dir, "--bin-dir", create=True)
    entry = entry_of(args)
    source = Path(args.plugin) if args.plugin else default_plugin()
    copied = install_binary(source, bin_dir)
    say(f"{'installed' if copied else 'up to date:'} {bin_dir / PLUGIN}")
    # The binary first: a list naming a plugin the runtime cannot find fails every ADD.
    changed = rewrite(cl, lambda conf: with_entry(conf, entry))
    say(f"{'chained' if changed else 'already chained:'} {PLUGIN} last in {cl.path} "
        f"(network {cl.name})")
    return 0


def cmd_uninstall(args) -> int:
    conf_dir = safe_directory(args.conf_dir, "--conf-dir")
    # A binary directory that is not there holds no plugin: nothing to remove from it.
    bin_dir = safe_directory(args.bin_dir, "--bin-dir") if os.path.lexists(args.bin_dir) \
        else None
    if args.network is not None:
        lists = [choose(conf_dir, args.network)]
    else:
        lists = []
        for path in conf_files(conf_dir):
            cl = read_conf(path)
            if cl.conf is None:
                print(f"mirror: left {path} alone: {cl.error}", file=sys.stderr)
            elif isinstance(cl.conf, dict) and isinstance(cl.conf.get("plugins"), list):
                lists.append(cl)
    removed = [cl for cl in lists if rewrite(cl, without_entry)]
    for cl in removed:
        say(f"removed {PLUGIN} from {cl.path} (network {cl.name})")
    if not removed:
        say(f"no {PLUGIN} entry in {lists[0].path if args.network else conf_dir}")
    # The runtime runs a list's plugins by name from the binary directory: the binary goes
    # only when no list here names it any more.
    still = [p.name for p in conf_files(conf_dir) if chains_us(p)]
    target = bin_dir / PLUGIN if bin_dir else Path(args.bin_dir) / PLUGIN
    if still:
        say(f"kept {target}: {', '.join(still)} still chain{'s' if len(still) == 1 else ''} it")
    elif bin_dir is not None and existing_binary(target) is not None:
        os.unlink(target)
        say(f"removed {target}")
    else:
        say(f"no {target} to remove")
    return 0


def chains_us(path: Path) -> bool:
    try:
        cl = read_conf(path)
    except UsageError:
        return False
    plugins = cl.conf.get("plugins") if isinstance(cl.conf, dict) else None
    return isinstance(plugins, list) and any(map(is_ours, plugins))
