"""A fresh virtual environment for the tests that install something into one (test_wheel, test_bootstrap)."""
import os
import subprocess
import sys
from pathlib import Path


def has_uv() -> bool:
    """Whether this environment has uv (scripts/setup installs it where it can)."""
    return subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True).returncode == 0


def make_venv(path: Path, env: dict) -> Path:
    """A plain venv at path (no --system-site-packages) with pip in it; returns its python.

    `python -m venv` installs pip from the interpreter's bundled wheel and byte-compiles all of it (about
    6 s on one core); with uv, the venv is made without pip and uv installs pip (about 1 s)."""
    py = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if has_uv():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True, env=env)
        subprocess.run([sys.executable, "-m", "uv", "pip", "install", "-q", "--python", py, "pip"], check=True, env=env,
                       capture_output=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", path], check=True, env=env)
    return py
