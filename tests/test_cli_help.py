"""`--help` of the program and of every command it lists prints a usage and exits 0.

The command list is read from `mirror --help` itself, so a command added later is
covered without touching this file."""
from __future__ import annotations

import os
import re

import pytest

from helpers import run_cli

pytestmark = pytest.mark.unit

# A command line in argparse's "positional arguments" block: four spaces, then the name.
# Wrapped help text is indented further, so it never matches.
COMMAND_LINE = re.compile(r"^ {4}([a-z][a-z0-9-]*)(?:\s|$)")


def clean_env() -> dict:
    """The caller's MIRROR_* settings become defaults; keep the built-in ones under test."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}


def listed_commands() -> list[str]:
    """The commands `mirror --help` lists. Raises (a loud collection error) rather than
    returning an empty list, which would make the parametrized test below vanish."""
    r = run_cli("--help", env=clean_env())
    if r.returncode != 0:
        raise RuntimeError(f"mirror --help exited {r.returncode}:\n{r.stderr}")
    block = r.stdout.split("positional arguments:", 1)[-1].split("\n\n", 1)[0]
    names = [m.group(1) for m in map(COMMAND_LINE.match, block.splitlines()) if m]
    if not names:
        raise RuntimeError(f"no commands found in mirror --help:\n{r.stdout}")
    return names


def test_program_help_lists_commands():
    assert "run" in listed_commands()


@pytest.mark.parametrize("command", listed_commands())
def test_command_help(command):
    r = run_cli(command, "--help", env=clean_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: mirror {command} "), r.stdout
    assert r.stderr == ""
