"""The book's spine: src/ matches the notebooks, pairs are in sync, the runner reports and fails well."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nb
from annotated_transformer import runtime

ROOT = nb.ROOT


def test_src_is_what_the_notebooks_export():
    assert nb.export_differences() == [], "run `python tools/nb.py export` and commit src/"


def test_every_py_chapter_has_an_ipynb_pair_with_the_same_cells():
    assert nb.pair_differences() == [], "run `python tools/nb.py sync` (or `store`) after editing a .py"


def test_toc_lists_every_chapter_once():
    listed = nb.chapters()
    on_disk = sorted((ROOT / "notebooks").glob("*.py"))
    assert len(listed) == len(set(listed))
    assert sorted(listed) == on_disk


@pytest.mark.parametrize("src", sorted((ROOT / "notebooks").glob("*.py")), ids=lambda p: p.stem)
def test_chapter_has_papermill_parameters(src):
    cells = nb.read(src).cells
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{src.name} needs exactly one cell tagged 'parameters'"
    for name in ("device", "profile", "seed"):
        assert re.search(rf"^{name}\s*=", tagged[0].source, re.M), f"{src.name}'s parameters cell lacks {name}"
    # The pair keeps the tag too (papermill reads the .ipynb).
    pair = nb.read(src.with_suffix(".ipynb")).cells
    assert any("parameters" in c.metadata.get("tags", []) for c in pair)


@pytest.mark.parametrize("src", sorted((ROOT / "notebooks").glob("*.py")), ids=lambda p: p.stem)
def test_stored_outputs_come_from_a_real_run(src):
    """nbval only compares cells with stored execution counts: every code cell must have one."""
    cells = nb.read(src.with_suffix(".ipynb")).cells
    missing = [i for i, c in enumerate(cells) if c.cell_type == "code" and c.get("execution_count") is None]
    assert not missing, f"{src.stem}.ipynb cells {missing} were never executed: run `python tools/nb.py store {src.stem}`"


def test_generated_modules_name_their_notebook():
    for path, text in nb.render_exports().items():
        first = text.splitlines()[0]
        assert first.startswith(nb.GENERATED_MARK), path
        if path.name != "__init__.py":
            source = first.split(" from ", 1)[1]
            assert (ROOT / source).exists(), f"{path.name} names {source}, which does not exist"


def test_exporter_rejects_export_without_default(tmp_path, monkeypatch):
    bad = tmp_path / "99_bad.py"
    bad.write_text("# %%\n#| export\nx = 1\n")
    with pytest.raises(SystemExit, match="without a '#| default_exp'"):
        nb.exports_of(bad)


def test_exporter_lists_every_name_of_a_tuple_assignment():
    assert nb.public_names("A, (B, _c) = 1, (2, 3)\nD: int = 4\n[E, F] = 5, 6\n") == ["A", "B", "D", "E", "F"]


def test_generated_modules_keep_their_docstring():
    """The docstring must stay the module's first statement (before __all__), or help() loses it."""
    doc, rest = nb.split_docstring('"""One line.\n\nMore."""\nimport os\n')
    assert doc == '"""One line.\n\nMore."""' and rest.strip() == "import os"
    for path, text in nb.render_exports().items():
        if path.name == "__init__.py":
            continue
        import ast
        body = ast.parse(text).body
        has_doc = body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
        cells_doc = nb.split_docstring("\n".join(l for l in text.splitlines() if not l.startswith("#")))[0]
        assert bool(has_doc) == bool(cells_doc), path.name


def _chapter(path, text):
    path.write_text(text)
    return path


def test_flow_check_finds_imports_from_later_chapters_and_from_itself(tmp_path):
    one = _chapter(tmp_path / "01_a.py", "# %%\n#| default_exp alpha\n# %%\n#| export\ndef f(): pass\n"
                                         "# %%\nfrom annotated_transformer.beta import g\n")
    two = _chapter(tmp_path / "02_b.py", "# %%\n#| default_exp beta\n# %%\n#| export\n"
                                         "from annotated_transformer.alpha import f\ndef g(): pass\n"
                                         "# %%\nfrom annotated_transformer import g, f\n")
    problems = nb.flow_problems([one, two])
    assert len(problems) == 2, problems
    assert "01_a.py, cell 2: imports 'g'" in problems[0] and "later chapter, 02_b.py" in problems[0]
    assert "02_b.py, cell 2: imports 'g'" in problems[1] and "this chapter itself" in problems[1]


def test_the_book_flows_one_way():
    assert nb.flow_problems(nb.chapters()) == []


def test_public_api_is_importable():
    """The top level is the curated list, each name the object its module defines, visible to type checkers
    through TYPE_CHECKING imports; every other public name says which module it lives in."""
    import ast
    import importlib

    import annotated_transformer as at

    exports = {p.stem: t for p, t in nb.render_exports().items() if p.name != "__init__.py"}
    assert at.__all__ == nb.CURATED and 20 <= len(at.__all__) <= 30
    homes = {}
    for module_name, text in exports.items():
        module = importlib.import_module(f"annotated_transformer.{module_name}")
        assert getattr(at, module_name) is module                    # modules stay reachable by attribute
        names = re.search(r"^__all__ = (\[.*?\])$", text, re.M).group(1)
        for name in eval(names):  # the list literal the exporter wrote
            assert hasattr(module, name)
            if name in exports:  # a name equal to a module's name: the attribute is the module
                continue
            homes[name] = module_name
            if name in nb.CURATED:
                assert getattr(at, name) is getattr(module, name), f"annotated_transformer.{name} is not exposed"
            else:
                with pytest.raises(AttributeError, match=re.escape(
                        f"lives in annotated_transformer.{module_name}: "
                        f"from annotated_transformer.{module_name} import {name}")):
                    getattr(at, name)
    # what an IDE or a type checker sees: the same names, imported from the modules that define them
    tree = ast.parse((nb.PKG / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {alias.name: node.module.split(".", 1)[1] for node in block.body for alias in node.names}
    assert seen == {name: homes[name] for name in nb.CURATED}
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        at.no_such_name


def test_one_meaning_per_name():
    """No module shares its name with a function (decode, translate) and no name has two homes."""
    import importlib.util

    for gone in ("decode", "translate"):
        assert importlib.util.find_spec(f"annotated_transformer.{gone}") is None
    import annotated_transformer as at

    assert callable(at.translate) and at.translation.translate is at.translate
    from annotated_transformer import data, model

    assert not hasattr(data, "encode") and not hasattr(data, "decode") and not hasattr(model, "from_torch")
    with pytest.raises(SystemExit, match="listed twice: fit"):
        nb.render_init([("train", ["fit"])], curated=["fit", "fit"])
    with pytest.raises(SystemExit, match="exported by no chapter: nowhere"):
        nb.render_init([("train", ["fit"])], curated=["fit", "nowhere"])
    with pytest.raises(SystemExit, match="'f' is exported by both a.py and b.py"):
        nb.render_init([("a", ["f"]), ("b", ["f"])], curated=[])


TOP_LEVEL_IMPORT = re.compile(r"^\s*from annotated_transformer import (?:\(([^)]*)\)|([\w, ]+))", re.M)


def test_top_level_imports_name_only_curated_names():
    """`from annotated_transformer import X` works for the curated names (and modules) only, so the book,
    the tests and the docs import every other name from its module."""
    modules = {p.stem for p in nb.PKG.glob("*.py")} - {"__init__"}
    problems = []
    for path in [*sorted((ROOT / "notebooks").glob("*.py")), *sorted((ROOT / "tests").glob("*.py")),
                 *sorted((ROOT / "book").glob("*.md")), ROOT / "README.md", ROOT / "CONTRIBUTING.md"]:
        for match in TOP_LEVEL_IMPORT.finditer(path.read_text()):
            names = [n.split(" as ")[0].strip() for n in (match.group(1) or match.group(2)).replace("\n", ",").split(",")
                     if n.strip()]
            bad = [n for n in names if n not in nb.CURATED and n not in modules]
            if bad:
                problems.append(f"{path.relative_to(ROOT)}: {', '.join(bad)}")
    assert problems == []


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "nb.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_runner_executes_with_parameters_and_writes_a_report(tmp_path):
    proc = run_tool("run", "tests/fixtures/tiny_ok.py", "--profile", "full", "--device", "cpu", "--seed", "7",
                    "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "tiny_ok.json").read_text())
    assert report["ok"] is True
    assert (report["profile"], report["device"], report["seed"]) == ("full", "cpu", 7)
    assert report["torch"] == torch.__version__
    assert report["wall_s"] > 0 and report["peak_rss_mib"] > 50  # the kernel imported torch
    executed = nb.read(tmp_path / "tiny_ok.ipynb")
    outputs = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "full cpu 7" in outputs


def test_runner_names_the_failing_chapter_and_cell(tmp_path):
    proc = run_tool("run", "tests/fixtures/tiny_fail.py", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode != 0
    # The third cell of the fixture's source raises (parameters, x = 1, raise).
    assert "FAILED: chapter tests/fixtures/tiny_fail.py, cell 3 of 3" in proc.stderr
    assert "raise ValueError" in proc.stderr and "on purpose" in proc.stderr
    report = json.loads((tmp_path / "tiny_fail.json").read_text())
    assert report["ok"] is False and report["error"]["ename"] == "ValueError"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_runner_refuses_cuda_without_a_gpu(tmp_path):
    proc = run_tool("run", "tests/fixtures/tiny_ok.py", "--device", "cuda", "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "sees no CUDA GPU" in proc.stderr + proc.stdout
    assert not (tmp_path / "tiny_ok.json").exists()


def test_runner_rejects_unknown_chapter():
    proc = run_tool("run", "no_such_chapter")
    assert proc.returncode != 0 and "no chapter matches 'no_such_chapter'" in proc.stderr


@pytest.mark.parametrize("bad, error", [("tpu", ValueError), (3, TypeError)])
def test_resolve_device_rejects_bad_names(bad, error):
    with pytest.raises(error, match="device"):
        runtime.resolve_device(bad)


def test_setup_checks_profile_and_seed():
    assert runtime.setup("cpu", "quick", 0).type == "cpu"
    with pytest.raises(ValueError, match="profile must be one of"):
        runtime.setup("cpu", "fast", 0)
    with pytest.raises(ValueError, match="seed must be"):
        runtime.setup("cpu", "quick", -1)


def test_seed_everything_repeats():
    runtime.seed_everything(3)
    a = torch.rand(4)
    runtime.seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_install_paths_pin_the_same_torch():
    setup = (ROOT / "scripts" / "setup").read_text()
    default = re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-(torch==[\d.]+)\}"', setup).group(1)
    env = (ROOT / "environment.yml").read_text()
    assert f"{default}+cpu" in env, "environment.yml pins another torch than scripts/setup"
    assert "-e .[book,test]" in env
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=' in pyproject  # a range the pinned build satisfies: pip installs nothing more


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "scripts/test" in readme and "scripts/book" in readme
    assert re.search(r"^exec scripts/test$", (ROOT / ".ci" / "run").read_text(), re.M)


def _stored_text(path: Path) -> str:
    """Every text output of a stored notebook (images excluded), plus error tracebacks."""
    parts = []
    for cell in nb.read(path).cells:
        for out in cell.get("outputs", []):
            parts.append(str(out.get("text", "")))
            parts += [str(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
            parts += out.get("traceback", [])
    return "\n".join(parts)


@pytest.mark.parametrize("ipynb", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_stored_outputs_carry_no_paths_machine_names_or_secrets(ipynb):
    import socket

    text = _stored_text(ipynb)
    leaks = [s for s in (str(ROOT), str(Path.home()), "/work/", "/root/", "/home/", "site-packages")
             if s in text]
    host = socket.gethostname()
    if len(host) > 3 and host in text:
        leaks.append(f"hostname {host!r}")
    if re.search(r"(api[_-]?key|secret|token)\s*[=:]\s*['\"][A-Za-z0-9_\-]{16,}", text, re.I):
        leaks.append("something that looks like a credential")
    assert not leaks, f"{ipynb.name} outputs contain {leaks}"
    assert "Traceback" not in text, f"{ipynb.name} stored an error"


def test_every_citation_has_a_bibliography_entry():
    keys = set(re.findall(r"^@\w+\{([^,]+),", (ROOT / "book" / "references.bib").read_text(), re.M))
    pages = sorted((ROOT / "notebooks").glob("*.py")) + sorted((ROOT / "book").glob("*.md"))
    cited = {(p.name, k.strip()) for p in pages for group in re.findall(r"\{cite[^}]*\}`([^`]+)`", p.read_text())
             for k in group.split(",")}
    missing = sorted(f"{page}: {key}" for page, key in cited if key not in keys)
    assert not missing, f"citations without an entry in book/references.bib: {missing}"


def test_links_between_chapters_resolve():
    """Every relative link to a chapter or page (`NN_name.ipynb`, `notes.md`) names a file that exists."""
    pages = sorted((ROOT / "notebooks").glob("*.py")) + sorted((ROOT / "book").glob("*.md"))
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+\.(?:ipynb|md))(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            if not (page.parent / target).exists() and not (page.parent / target).with_suffix(".py").exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken links: {broken}"


@pytest.mark.parametrize("ipynb", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_stored_outputs_carry_no_progress_bars(ipynb):
    import nbformat

    residue = [i for i, c in enumerate(nbformat.read(ipynb, as_version=4).cells)
               for o in c.get("outputs", []) if o.get("output_type") == "stream" and nb.PROGRESS.search(o.get("text", ""))]
    assert not residue, f"{ipynb.name}: progress-bar output in cells {residue}: store with `python tools/nb.py store`"


def test_progress_lines_are_stripped_and_other_output_kept():
    import nbformat

    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    book.cells[0].outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="epoch:  40%|████      | 2/5 [00:01<00:02,  1.50it/s]\r"
                                                               "epoch: 100%|██████████| 5/5 [00:03<00:00,  1.52it/s]\n"),
        nbformat.v4.new_output("stream", name="stdout", text="step 10 loss 1.234\n 50%|█| 1/2 [00:00<00:00]\nfinal 0.5\n"),
    ]
    nb.strip_progress(book)
    assert [o["text"] for o in book.cells[0].outputs] == ["step 10 loss 1.234\nfinal 0.5\n"]


def test_machinery_cells_are_hidden_in_the_staged_book():
    import nbformat

    cells = [nbformat.v4.new_code_cell('device = "auto"', metadata={"tags": ["parameters"]}),
             nbformat.v4.new_code_cell("#| default_exp x\nfrom annotated_transformer.runtime import setup\n"
                                       "device = setup(device, profile, seed)"),
             nbformat.v4.new_code_cell("import torch\nfrom torch import (\n    nn,\n)"),
             nbformat.v4.new_code_cell("import torch\nprint(torch.ones(2))"),
             nbformat.v4.new_code_cell("#| export\nimport torch")]
    book = nbformat.v4.new_notebook(cells=cells)
    nb.hide_machinery(book)
    assert ["remove-cell" in c.metadata.get("tags", []) for c in book.cells] == [True, True, True, False, False]
    assert nb.visible_code_lines(book) == 2 + 2   # the print cell and the exported one
