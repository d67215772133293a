import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# Test tiers. `scripts/test -m unit` runs the package's unit tests (well under a minute: the edit loop);
# `scripts/test` (what CI runs) runs everything: these, the chapters under nbval, the book in Chromium,
# the wheel in a fresh environment, the fault and pipeline tests.
UNIT_FILES = {
    "test_attention.py", "test_multihead.py", "test_positional.py", "test_norm.py", "test_residual.py",
    "test_model.py", "test_decoding.py", "test_weighted_average.py", "test_bad_input.py", "test_numerics.py",
    "test_determinism.py", "test_compile.py", "test_benchmarks.py", "test_train.py", "test_data.py",
    "test_translation.py", "test_pretrained.py", "test_lint.py", "test_variants.py", "test_lm.py",
    "test_ablations.py",
}
NOT_UNIT = {  # in a unit file, but runs a chapter, a subprocess or a training run of seconds
    "test_chapter_01_is_deterministic",
    "test_two_processes_equal_one_process_on_the_combined_batch",  # torchrun-style subprocesses
    "test_python_dash_m_runs", "test_concurrent_saves_to_one_path", "test_without_tokenizers_the_cli_names_the_extra",
    "test_quick_record_recomputes", "test_a_wrong_record_fails_the_check",  # test_lm: a training run each
    "test_worker_processes_give_what_one_process_gives_also_from_a_notebook_cell",  # test_ablations: spawned processes, training runs
    "test_one_run_scores_what_it_stores", "test_averaging_one_checkpoint_gives_the_final_weights",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: a fast test of the package alone (scripts/test -m unit)")
    config.addinivalue_line("markers", "slow: builds a fresh environment or runs a chapter (never in the unit tier)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        if path.parent == ROOT / "tests" and path.name in UNIT_FILES and item.originalname not in NOT_UNIT \
                and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.unit)
