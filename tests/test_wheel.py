"""The package as a user gets it: build the wheel, install it into a fresh virtual environment outside
the checkout, and use it from a folder that is not the repository.

The environment is a plain venv (no --system-site-packages): the interpreter it is made from may hold
packages of its own, and the point is to see what the wheel's metadata pulls in. torch is installed
first, pinned the way scripts/setup pins it (TORCH_SPEC, default torch==2.13.0, and TORCH_INDEX_URL if
set), so pip pulls no other build; the rest (numpy, tqdm) comes from the wheel's dependencies.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from fresh_env import make_venv

ROOT = Path(__file__).resolve().parents[1]
PIP = ["-m", "pip", "--disable-pip-version-check", "-q"]
INSTALL = ["install", "--no-compile"]  # bytecode is written on import, not for all of torch (~20 s saved)


def _run(cmd, cwd, env, timeout=300):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # where a machine sets it, each of the three runs below compiles torch

    # 1. the wheel, built from a copy of what it is made of (the shared checkout gets no build/ or egg-info)
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    _run([sys.executable, *PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, tree], tmp_path, env)
    (wheel,) = dist.glob("annotated_transformer-*.whl")

    # 2. it carries the license, and says so in SPDX form
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (info,) = {n.split("/")[0] for n in names if ".dist-info/" in n}
        assert f"{info}/licenses/LICENSE" in names, names
        assert z.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        meta = z.read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in meta and "License-File: LICENSE" in meta, meta[:1500]
    assert not any(n.startswith(("tests/", "notebooks/")) for n in names)

    # 3. a fresh environment outside the checkout: torch pinned as scripts/setup does, then the wheel
    venv = tmp_path / "venv"
    py = make_venv(venv, env)
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    index = ["--index-url", os.environ["TORCH_INDEX_URL"]] if os.environ.get("TORCH_INDEX_URL") else []
    _run([py, *PIP, *INSTALL, torch_spec, *index], tmp_path, env, timeout=600)
    _run([py, *PIP, *INSTALL, wheel], tmp_path, env, timeout=600)

    # 4. used from a folder that is not the repository
    away = tmp_path / "elsewhere"
    away.mkdir()
    out = _run([py, "-c", (
        "import annotated_transformer as at, torch\n"
        "from annotated_transformer import make_model\n"
        "torch.manual_seed(0)\n"
        "m = make_model(11, 11, N=1, d_model=16, d_ff=32, h=2, dropout=0.0).eval()\n"
        "src = torch.tensor([[3, 4, 5, 2]]); tgt = torch.tensor([[1, 3, 4]])\n"
        "out = m(src, tgt)\n"
        "assert out.shape == (1, 3, 11) and torch.isfinite(out).all(), out.shape\n"
        "print(at.__file__)\n")], away, env)
    installed = Path(out.strip().splitlines()[-1]).resolve()
    assert venv.resolve() in installed.parents and ROOT not in installed.parents, installed
    assert "usage: python -m annotated_transformer.train" in _run([py, "-m", "annotated_transformer.train", "--help"],
                                                                  away, env)
    # a base install has no tokenizers: the translation CLI must still answer --help (it imports them lazily)
    assert "usage:" in _run([py, "-m", "annotated_transformer.translation", "--help"], away, env)
