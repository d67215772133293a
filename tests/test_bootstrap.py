"""The launch buttons' path: a chapter opened on Colab (or Binder, or any Jupyter) where the package is
not installed installs it itself, from its hidden first cell, and runs.

Every chapter starts with the same cell (tools/bootstrap_cell.txt), tagged remove-cell so the HTML does
not show it. The slow test makes a fresh virtual environment that has what a Colab host has (torch,
matplotlib, a kernel) but not this package, executes chapter 4's stored notebook in it from an empty
folder, and checks that the chapter ran and that the package it used is the one the cell installed.
There is no GitHub here, so ANNOTATED_TRANSFORMER_SOURCE points the cell at a copy of this checkout.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import nb  # noqa: E402
from fresh_env import has_uv, make_venv  # noqa: E402

PIP = ["-m", "pip", "--disable-pip-version-check", "-q"]
INSTALL = ["install", "--no-compile"]  # bytecode is written on import, not for all of torch (~20 s saved)


def _host_install(py: Path, args: list[str], cwd, env):
    """Install the host's kernel packages: with uv where this environment has it (scripts/setup installs it;
    the same packages, resolved in seconds), else with pip. Torch is not installed this way: uv does not read
    the host's pip configuration (a local CPU wheel) and would fetch the CUDA build. Only the host is made
    with uv: the chapter's own cell runs pip, as on Colab."""
    if has_uv():
        return _run([sys.executable, "-m", "uv", "pip", "install", "-q", "--python", py, *args], cwd, env)
    return _run([py, *PIP, *INSTALL, *args], cwd, env)
CELL = (ROOT / "tools" / "bootstrap_cell.txt").read_text()


def _first_code_cell(src: Path):
    return next(c for c in nb.read(src).cells if c.cell_type == "code")


@pytest.mark.parametrize("src", nb.chapters(), ids=lambda p: p.stem)
def test_every_chapter_starts_with_the_bootstrap_cell(src):
    cell = _first_code_cell(src)
    want = CELL.split("\n", 1)[1].strip()  # the text after the "# %% tags=..." line
    assert cell.source.strip() == want, f"{src.name}: the first code cell is not tools/bootstrap_cell.txt"
    assert "remove-cell" in cell.metadata.get("tags", []), f"{src.name}: the bootstrap cell must be hidden"
    pair = nb.read(src.with_suffix(".ipynb"))
    assert _first_code_cell(src.with_suffix(".ipynb")).source.strip() == want, f"{pair} is not re-paired"


def _run(cmd, cwd, env, timeout=900):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


EXECUTE = """
import sys, nbformat
from nbclient import NotebookClient
notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
assert not errors, errors
import annotated_transformer, torch
print(torch.__version__)
print(annotated_transformer.__file__)
"""


@pytest.mark.slow
def test_a_chapter_installs_the_package_itself_in_a_fresh_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    # Bytecode written on import (some machines set PYTHONDONTWRITEBYTECODE, and then every process in the
    # host compiles torch again), none written by pip for everything it installs (PIP_COMPILE=false is
    # --no-compile; the spelling PIP_NO_COMPILE=1 would turn compiling *on*): what the cell does is unchanged.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PIP_COMPILE"] = "false"
    # a copy of what the package is built from (the shared checkout gets no build/ or egg-info)
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env["ANNOTATED_TRANSFORMER_SOURCE"] = tree.as_uri()

    # the host: torch as scripts/setup pins it, a kernel, matplotlib; not this package
    venv = tmp_path / "venv"
    py = make_venv(venv, env)
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    index = ["--index-url", os.environ["TORCH_INDEX_URL"]] if os.environ.get("TORCH_INDEX_URL") else []
    _run([py, *PIP, *INSTALL, torch_spec, *index], tmp_path, env)
    _host_install(py, ["ipykernel", "nbclient", "nbformat", "matplotlib"], tmp_path, env)
    probe = subprocess.run([py, "-c", "import annotated_transformer"], capture_output=True, env=env)
    assert probe.returncode != 0, "the fresh environment already has the package"

    # an empty folder, as on Colab, holding only the notebook
    work = tmp_path / "content"
    work.mkdir()
    chapter = shutil.copy2(ROOT / "notebooks" / "04_positional_encoding.ipynb", work)
    out = _run([py, "-c", EXECUTE, chapter], work, env)
    torch_after, installed = out.strip().splitlines()[-2:]
    installed = Path(installed).resolve()
    assert venv.resolve() in installed.parents, installed
    assert torch_after.startswith(torch_spec.split("==")[-1]), f"the cell replaced torch: {torch_after}"
