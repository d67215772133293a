"""tools/run_plain.py: a chapter's source run as a plain script, parameters injected as papermill does."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "run_plain.py"

CHAPTER = '''# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
# ---

# %% [markdown]
# # A chapter
# raise SystemExit("markdown must not run")

# %% tags=["parameters"]
profile = "quick"
budget_minutes = None

# %%
import matplotlib.pyplot as plt
plt.plot([0, 1], [1, 0])
plt.show()
print(f"profile={profile} budget={budget_minutes!r} main={__name__ == '__main__'}")
'''


def run(tmp_path, *params):
    src = tmp_path / "01_chapter.py"
    src.write_text(CHAPTER)
    return subprocess.run([sys.executable, str(TOOL), str(src), *params], capture_output=True, text=True,
                          env={"FIGURES_DIR": str(tmp_path / "fig"), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_parameters_are_injected_after_the_parameters_cell(tmp_path):
    done = run(tmp_path, "profile=full", "budget_minutes=4.5")
    assert done.returncode == 0, done.stderr
    assert "profile=full budget=4.5 main=True" in done.stdout
    assert (tmp_path / "fig" / "figure-01.png").is_file()  # plt.show saves instead of showing


def test_defaults_and_unknown_parameters(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "profile=quick budget=None" in done.stdout
    bad = run(tmp_path, "profle=full")
    assert bad.returncode != 0 and "profle" in bad.stderr
    malformed = run(tmp_path, "full")
    assert malformed.returncode != 0 and "name=value" in malformed.stderr


def test_a_cell_list_runs_where_jupytext_is_missing(tmp_path):
    """The lent GPU machine has no jupytext: the cells are listed here (by jupytext) and run there."""
    src = tmp_path / "01_chapter.py"
    src.write_text(CHAPTER)
    listed = tmp_path / "cells" / "01_chapter.json"
    made = subprocess.run([sys.executable, str(TOOL), "--cells", str(src), str(listed)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    no_jupytext = ("import runpy, sys; sys.modules['jupytext'] = None; "
                   f"sys.argv = [{str(TOOL)!r}, {str(listed)!r}, 'profile=full']; "
                   f"runpy.run_path({str(TOOL)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", no_jupytext], capture_output=True, text=True, timeout=120,
                          env={"FIGURES_DIR": str(tmp_path / "fig"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "profile=full budget=None main=True" in done.stdout
    assert "markdown must not run" not in done.stdout + done.stderr
