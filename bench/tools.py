"""Tools the bench installs from PyPI on first use, each in a virtualenv of its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.testbed import BenchError


def venv_tool(venv: Path, packages: Sequence[str], command: str) -> Path:
    """``venv/bin/command``, creating ``venv`` and installing ``packages`` when missing.

    The project's own ``.venv`` is never touched.
    """
    binary = venv / "bin" / command
    if binary.exists():
        return binary
    sys.stderr.write(f"bench: installing {', '.join(packages)} into {venv} ...\n")
    base = getattr(sys, "_base_executable", None) or sys.executable
    made = subprocess.run(
        [base, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        raise BenchError(f"cannot create {venv}: {made.stderr.strip()[-500:]}")
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    result = subprocess.run(
        [*pip, *packages], capture_output=True, text=True, check=False, timeout=600
    )
    if result.returncode != 0 or not binary.exists():
        raise BenchError(f"cannot install {', '.join(packages)}: {result.stderr.strip()[-500:]}")
    return binary
