"""Run-time set-up shared by every chapter: device choice, seeding, profiles.

Hand-written (not exported from a notebook): it is the plumbing the papermill runner and
each chapter's parameters cell rely on.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["PROFILES", "resolve_device", "seed_everything", "setup", "data_dir", "repo_root", "glue"]

PROFILES = ("quick", "full")


def resolve_device(device: str = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda[:n]" into a torch.device, refusing CUDA where there is none."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string like 'auto', 'cpu' or 'cuda', got {type(device).__name__}")
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={name!r} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                "use device='cpu' or 'auto', or install a CUDA build of torch (TORCH_SPEC, see README)"
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}: expected 'auto', 'cpu' or 'cuda[:n]'")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a chapter's run is repeatable."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(device: str = "auto", profile: str = "quick", seed: int = 0) -> torch.device:
    """What every chapter's first code cell calls with its papermill parameters."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    seed_everything(seed)
    return resolve_device(device)


def repo_root() -> "os.PathLike[str]":
    """The checkout this package lives in (src layout), or the current directory when installed."""
    from pathlib import Path

    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "notebooks").is_dir():
            return parent
    return Path.cwd()


def data_dir() -> "os.PathLike[str]":
    """Where downloaded data is cached: $ANNOTATED_TRANSFORMER_DATA or ~/.cache/annotated_transformer."""
    from pathlib import Path

    env = os.environ.get("ANNOTATED_TRANSFORMER_DATA")
    return Path(env) if env else Path.home() / ".cache" / "annotated_transformer"


def glue(name: str, value, fmt: str | None = None):
    """Hand a number the prose quotes to the book: `{glue:text}`name`` in a markdown cell shows it.

    With `fmt` (a format spec such as ".2f", ",d" or ".0%") the value is formatted here, once, and the
    prose shows exactly that text. Under Jupyter Book (myst-nb importable, inside an IPython kernel) the
    value is stored in the cell's outputs without being displayed; anywhere else (Colab, a plain Python
    process) nothing happens. Returns None, so a glue() on a cell's last line shows nothing either.
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"glue needs a name of letters, digits, '_' or '-', got {name!r}")
    text = value if fmt is None else format(value, fmt)
    try:
        from IPython import get_ipython
        from myst_nb import glue as _myst_glue
    except ImportError:
        return None
    if get_ipython() is None:  # a plain Python process: IPython's display would print the raw bundle
        return None
    _myst_glue(name, text, display=False)
    return None
