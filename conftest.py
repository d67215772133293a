"""Loaded by pytest for every test path (tests/ and the chapters nbval runs from notebooks/).

The book's data mirror: the build machines and CI have no internet access and keep Multi30k in
../shared/data. The package only reads a mirror it is given; the tests, and the chapters' kernels
(which inherit this environment), are given this one.
"""
import os
from pathlib import Path

_SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
if _SHARED.is_dir():
    os.environ.setdefault("ANNOTATED_TRANSFORMER_SHARED_DATA", str(_SHARED))
