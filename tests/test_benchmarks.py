"""The benchmark suite's own logic (its speed figures are measured by benchmarks/run.py, never asserted)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import sync_check  # noqa: E402


@pytest.mark.parametrize("name,flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
])
def test_datasheet_peak_is_found_by_device_name(name, flops):
    peak = common.datasheet_peak(name)
    assert peak["flops"] == flops and peak["gpu"] == name and "datasheet" in peak["source"]


@pytest.mark.parametrize("name", [None, "", "NVIDIA GeForce RTX 4090", "Tesla T4"])
def test_unknown_gpus_have_no_datasheet_peak(name):
    assert common.datasheet_peak(name) is None            # MFU against it is reported as None, never guessed


def test_sync_check_runs_its_steps(tmp_path):
    """On a CPU the sync check exercises the same training and decoding steps (a GPU raises on a sync)."""
    out = tmp_path / "sync.json"
    assert sync_check.main(["--device", "cpu", "--out", str(out)]) == 0
    assert '"host_syncs": "none"' in out.read_text()
