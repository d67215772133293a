"""Run a chapter's source (notebooks/NN_*.py, jupytext percent format) as a plain Python script.

For machines that have torch but no Jupyter stack (papermill, ipykernel), such as a lent GPU
machine: the chapter's code cells run in order in one namespace, with the papermill parameters
given here assigned right after the `parameters` cell, as papermill would inject them. Figures are
saved as PNG files instead of shown. The book itself is always built with papermill (tools/nb.py).

    python tools/run_plain.py notebooks/10_translation.py profile=full device=cuda budget_minutes=4

The cells are read by jupytext, the one parser of the percent format the project uses. A machine
without jupytext runs a cell list made here beforehand (plain JSON, read with the standard library):

    python tools/run_plain.py --cells notebooks/10_translation.py .devcarry/cells/10_translation.json
    python3 tools/run_plain.py .devcarry/cells/10_translation.json profile=full device=cuda
"""
from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cells(path: Path) -> tuple[str, list[tuple[list[str], str]]]:
    """(chapter name, [(tags, source)] of its code cells): from jupytext, or from a --cells JSON file."""
    if path.suffix == ".json":
        made = json.loads(path.read_text())
        return made["chapter"], [(c["tags"], c["source"]) for c in made["cells"]]
    import jupytext

    notebook = jupytext.read(path)
    return path.name, [(list(c.metadata.get("tags", [])), c.source) for c in notebook.cells if c.cell_type == "code"]


def write_cells(src: Path, target: Path) -> None:
    name, code = cells(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"chapter": name, "cells": [{"tags": t, "source": s} for t, s in code]}, indent=1))


def parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"error: parameters are name=value, got {item!r}")
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value  # a bare string: device=cuda
    return params


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    if argv[0] == "--cells":
        if len(argv) != 3:
            raise SystemExit("usage: run_plain.py --cells CHAPTER.py TARGET.json")
        write_cells(Path(argv[1]), Path(argv[2]))
        return 0
    path, params = Path(argv[0]), parse_params(argv[1:])
    chapter, code = cells(path)
    if not any("parameters" in tags for tags, _ in code):
        raise SystemExit(f"error: {path} has no cell tagged parameters")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = Path(os.environ.get("FIGURES_DIR", ROOT / "build" / "plain" / Path(chapter).stem)).resolve()
    figures.mkdir(parents=True, exist_ok=True)
    shown = [0]

    def show(*args, **kwargs):
        for num in plt.get_fignums():
            shown[0] += 1
            plt.figure(num).savefig(figures / f"figure-{shown[0]:02d}.png", dpi=80)
        plt.close("all")

    plt.show = show
    sys.path.insert(0, str(ROOT / "src"))
    os.chdir(path.resolve().parent if path.suffix == ".py" else ROOT / "notebooks")  # papermill runs chapters there
    namespace = {"__name__": "__main__"}
    start = time.perf_counter()
    for i, (tags, body) in enumerate(code, 1):
        exec(compile(body, f"{chapter}[cell {i}]", "exec"), namespace)
        if "parameters" in tags:
            unknown = set(params) - set(namespace)
            if unknown:
                raise SystemExit(f"error: {sorted(unknown)} are not parameters of {chapter}")
            namespace.update(params)
        print(f"[run_plain] cell {i}/{len(code)} done at {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
