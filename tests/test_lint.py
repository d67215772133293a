"""The sources are linted: `ruff check` (rules in ruff.toml) over the chapters, the package, the tests,
the tools and the benchmarks. Unused imports and undefined names fail the test command like any test."""
import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
