"""Runs many `mirror` command lines for tests/test_hostile.py, each in a process of its
own but without a new interpreter: the CLI is imported once, and each row is a fork that
sets its environment and calls mirror.cli.main(). Four hundred rows take seconds instead
of minutes, and every row is still a process of its own (a value wrongly accepted runs a
controller there, which is killed when its time is up).

Reads a JSON list of {"argv", "env", "timeout"} on standard input, writes a JSON list of
{"rc", "stdout", "stderr", "timed_out"} on standard output. The caller runs it in a
network namespace of its own (unshare --net)."""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mirror.cli  # noqa: E402  (after the checkout is on the path)


def run_row(argv: list[str], env: dict, timeout: float) -> dict:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.setsid()         # its own process group: killed whole when its time is up
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.environ.clear()
            os.environ.update(env)
            code = mirror.cli.main(argv)
        except SystemExit as exc:           # argparse's own exits
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    received: dict[int, list[bytes]] = {out_r: [], err_r: []}
    open_fds = {out_r, err_r}
    deadline = time.monotonic() + timeout
    timed_out = False
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.killpg(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select(list(open_fds), [], [], left)
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                received[fd].append(data)
            else:
                open_fds.discard(fd)
    status = os.waitpid(pid, 0)[1]
    for fd in (out_r, err_r):
        os.close(fd)
    return {"rc": os.waitstatus_to_exitcode(status),
            "stdout": b"".join(received[out_r]).decode(errors="replace"),
            "stderr": b"".join(received[err_r]).decode(errors="replace"),
            "timed_out": timed_out}


def main() -> None:
    rows = json.load(sys.stdin)
    results = [run_row(r["argv"], r["env"], r["timeout"]) for r in rows]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
