"""The book builds (warnings are errors) and every page loads in real headless Chromium."""
import functools
import http.server
import os
import shutil
import threading

import pytest

import nb

ROOT = nb.ROOT
ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def html(tmp_path_factory):
    """Build the book from the stored notebooks (their outputs come from a real quick run)."""
    out = tmp_path_factory.mktemp("site")
    index = nb.build_book(ROOT / "notebooks", out)
    return index.parent


@pytest.fixture(scope="session")
def server(html):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def chromium_path():
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium: scripts/setup installs Debian's chromium, or set CHROMIUM=/path/to/chromium")
    return path


def test_every_page_in_the_toc_was_written(html):
    pages = nb.expected_pages(html)
    assert len(pages) >= 4
    for page in pages:
        assert page.exists() and page.stat().st_size > 2000, page


def test_math_is_served_offline(html):
    assert (html / "_static" / "mathjax" / "tex-mml-chtml.js").exists()
    index = (html / "index.html").read_text()
    if 'http-equiv="Refresh"' in index:  # Jupyter Book's index.html redirects to the root page
        index = (html / index.split("url=", 1)[1].split('"', 1)[0]).read_text()
    assert "cdn.jsdelivr.net" not in index and "mathjax/tex-mml-chtml.js" in index


def test_pages_load_without_errors_and_math_renders(html, server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pages = [p.relative_to(html).as_posix() for p in nb.expected_pages(html)]
    first_chapter = next(p for p in pages if p.startswith("notebooks/"))
    problems, math_pages = [], 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        for rel in pages:
            errors.clear()
            response = page.goto(f"{server}/{rel}", wait_until="load")
            if response is None or response.status != 200:
                problems.append(f"{rel}: HTTP {response.status if response else 'no response'}")
                continue
            n_math = page.locator(".math").count()
            if n_math:
                math_pages += 1
                page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=15000)
                page.evaluate("MathJax.startup.promise")
                rendered = page.locator("mjx-container").count()
                if rendered < n_math:
                    problems.append(f"{rel}: {n_math} math elements but {rendered} rendered by MathJax")
                if page.locator("mjx-merror").count():
                    problems.append(f"{rel}: MathJax reported an error in the math")
            if rel == first_chapter:
                page.screenshot(path=str(ARTIFACTS / "first-chapter.png"), full_page=False)
            problems += [f"{rel}: {e}" for e in errors]
        browser.close()
    assert not problems, "\n".join(problems)
    assert math_pages >= 2, "expected math on the notes page and in the chapters"
    assert (ARTIFACTS / "first-chapter.png").stat().st_size > 10_000


def test_translation_attention_view_renders_and_redraws(html, server):
    """Chapter 10's interactive attention view: plotly.js (inlined in the page) draws the heat map with its
    colour bar, the <select>s redraw it, and the page logs no console error."""
    from playwright.sync_api import sync_playwright

    rel = "notebooks/10_translation.html"
    assert (html / rel).exists(), f"{rel} was not built"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.goto(f"{server}/{rel}", wait_until="load")
        plot = page.locator("#attn10-plot")
        plot.locator(".main-svg").first.wait_for(state="attached", timeout=30000)
        assert plot.locator(".hm image").count() == 1, "no heat map image in the view"
        assert plot.locator(".colorbar").count() == 1, "the heat map has no colour bar"
        title = plot.locator(".gtitle")
        assert title.text_content().startswith("cross-attention"), title.text_content()
        n_src = len(plot.locator(".xtick").all())
        page.select_option("#attn10-kind", "decoder_self")
        page.select_option("#attn10-layer", "0")
        page.select_option("#attn10-head", "1")
        assert title.text_content() == "decoder self-attention (masked), layer 1, head 2", title.text_content()
        n_sentences = page.locator("#attn10-sentence option").count()
        assert n_sentences >= 1 and page.locator("#attn10-head option").first.text_content() == "mean of heads"
        page.select_option("#attn10-sentence", str(n_sentences - 1))
        page.select_option("#attn10-kind", "encoder")
        assert title.text_content().startswith("encoder self-attention, layer 1, head 2")
        assert n_src > 0 and page.locator("#attn10-text").text_content().startswith("German: ")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.locator("#attn10").screenshot(path=str(ARTIFACTS / "attention-view.png"))
        browser.close()
    assert not errors, "\n".join(errors)
