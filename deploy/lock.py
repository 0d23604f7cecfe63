"""The lock: ``requirements.lock`` pins every package that advorch, its ``dev`` and ``s3``
extras, and torch install, for Python 3.11 on Linux x86_64. The venv (``make``) and the image
(``Dockerfile``) both install with it as pip constraints, so both get exactly the versions the
suite passed with.

    python deploy/lock.py             regenerate it with ``uv pip compile`` (``make lock``),
                                      keeping every pin that still fits
    python deploy/lock.py --upgrade   the same, every package at its newest version
    python deploy/lock.py --check     exit 1 when pyproject.toml's dependencies changed since

The lock's first line records a hash of pyproject.toml's dependency lists (``requires-python``,
``dependencies``, ``optional-dependencies``); ``--check`` recomputes it, so a dependency added
without ``make lock`` is caught by ``make lint`` and by ``tests/test_deploy.py``.

torch's version is set here and nowhere else: the Makefile and the Dockerfile install the
lock's ``torch==`` line. On a machine with a local CPU build (``2.13.0+cpu``) that line is
satisfied by it (a pin without a local label ignores the label), and the CUDA packages the lock
lists for PyPI's torch are only constraints: nothing there requires them, so pip never installs
them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"

TORCH_VERSION = "2.13.0"
EXTRAS = ("dev", "s3")
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"

HASH_PREFIX = "# pyproject-dependencies-sha256: "


def dependencies_hash(pyproject: Path) -> str:
    """sha256 of the parts of ``pyproject`` that decide what the lock holds."""
    project = tomllib.loads(pyproject.read_text())["project"]
    listed = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "torch": TORCH_VERSION,
    }
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()


def recorded_hash(lock: Path) -> str | None:
    """The hash the lock was generated for, or None when it has none."""
    for line in lock.read_text().splitlines():
        if line.startswith(HASH_PREFIX):
            return line.removeprefix(HASH_PREFIX).strip()
    return None


def check(pyproject: Path, lock: Path) -> str | None:
    """None when ``lock`` was generated from ``pyproject``'s dependencies, else why not."""
    if not lock.exists():
        return f"{lock.name} is missing: run `make lock`"
    if recorded_hash(lock) != dependencies_hash(pyproject):
        return (
            f"{lock.name} is stale: the dependencies in {pyproject.name} changed since it was "
            "generated; run `make lock` and commit both"
        )
    return None


def generate(pyproject: Path, lock: Path, upgrade: bool) -> None:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        sys.exit("uv is not installed: `make .venv/.installed` installs it (a dev extra)")
    with tempfile.TemporaryDirectory() as tmp:
        torch_pin = Path(tmp) / "torch.txt"
        torch_pin.write_text(f"torch=={TORCH_VERSION}\n")
        compiled = Path(tmp) / "requirements.lock"
        if lock.exists() and not upgrade:
            # uv keeps the versions it finds in its output file whenever they still fit.
            shutil.copy(lock, compiled)
        command = [
            uv, "pip", "compile", str(pyproject),
            *(arg for extra in EXTRAS for arg in ("--extra", extra)),
            "--constraints", str(torch_pin),
            "--python-version", PYTHON_VERSION,
            "--python-platform", PLATFORM,
            # PyPI only: a lock must not depend on what one machine's local wheel folders hold.
            "--index-url", "https://pypi.org/simple",
            *(["--upgrade"] if upgrade else []),
            "--no-header", "--quiet",
            "--output-file", str(compiled),
        ]  # fmt: skip
        # uv reads no pip.conf, but must trust this machine's CA bundle like pip does.
        env = {**os.environ, "UV_NATIVE_TLS": "1"}
        subprocess.run(command, check=True, env=env)
        # The annotation names the temporary file; name where the pin really comes from.
        pins = compiled.read_text().replace(f"-c {torch_pin}", "deploy/lock.py TORCH_VERSION")
    header = (
        f"{HASH_PREFIX}{dependencies_hash(pyproject)}\n"
        "# The pins of advorch's dependencies with its extras "
        f"({', '.join(EXTRAS)}) and torch=={TORCH_VERSION},\n"
        f"# for Python {PYTHON_VERSION} on Linux x86_64. Used as pip constraints "
        "(pip install -c requirements.lock ...).\n"
        "# Generated by `make lock` (python deploy/lock.py); do not edit by hand.\n"
    )
    lock.write_text(header + pins)
    print(f"wrote {lock} ({sum(1 for line in pins.splitlines() if '==' in line)} pins)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the lock is current")
    parser.add_argument("--upgrade", action="store_true", help="every package at its newest")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("--lock", type=Path, default=LOCK)
    args = parser.parse_args()
    if args.check:
        problem = check(args.pyproject, args.lock)
        if problem:
            sys.exit(f"error: {problem}")
        print(f"{args.lock.name} is current")
    else:
        generate(args.pyproject, args.lock, args.upgrade)


if __name__ == "__main__":
    main()
