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
