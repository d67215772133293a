"""Run a chapter's source (notebooks/NN_*.py, jupytext percent format) as a plain Python script.

For machines that have torch but no Jupyter stack (papermill, ipykernel), such as a lent GPU
machine: the chapter's code cells run in order in one namespace, with the papermill parameters
given here assigned right after the `parameters` cell, as papermill would inject them. Figures are
saved as PNG files instead of shown. The book itself is always built with papermill (tools/nb.py).

    python tools/run_plain.py notebooks/10_translation.py profile=full device=cuda budget_minutes=4
"""
from __future__ import annotations

import ast
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELL = re.compile(r"^# %%(.*)$")


def cells(source: str) -> list[tuple[str, str]]:
    """[(header, body)] for each `# %%` cell; markdown cells are skipped by the caller."""
    out, header, body = [], None, []
    for line in source.splitlines():
        m = CELL.match(line)
        if m:
            if header is not None:
                out.append((header, "\n".join(body)))
            header, body = m.group(1), []
        elif header is not None:
            body.append(line)
    if header is not None:
        out.append((header, "\n".join(body)))
    return out


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
    path, params = Path(argv[0]), parse_params(argv[1:])
    code = [(h, b) for h, b in cells(path.read_text()) if "[markdown]" not in h]
    if not any('tags=["parameters"]' in h for h, _ in code):
        raise SystemExit(f"error: {path} has no cell tagged parameters")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = Path(os.environ.get("FIGURES_DIR", ROOT / "build" / "plain" / path.stem)).resolve()
    figures.mkdir(parents=True, exist_ok=True)
    shown = [0]

    def show(*args, **kwargs):
        for num in plt.get_fignums():
            shown[0] += 1
            plt.figure(num).savefig(figures / f"figure-{shown[0]:02d}.png", dpi=80)
        plt.close("all")

    plt.show = show
    sys.path.insert(0, str(ROOT / "src"))
    os.chdir(path.resolve().parent)  # papermill runs chapters from notebooks/
    namespace = {"__name__": "__main__"}
    start = time.perf_counter()
    for i, (header, body) in enumerate(code, 1):
        exec(compile(body, f"{path.name}[cell {i}]", "exec"), namespace)
        if 'tags=["parameters"]' in header:
            unknown = set(params) - set(namespace)
            if unknown:
                raise SystemExit(f"error: {sorted(unknown)} are not parameters of {path.name}")
            namespace.update(params)
        print(f"[run_plain] cell {i}/{len(code)} done at {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
