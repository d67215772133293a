"""The notes, whole: book/notes.md transcribes every line of the handwritten notes, in order, and every
block and erratum points at a chapter section that exists.

What "the same line" means (the only normalisation, all of it markup):
- the notes file: runs of whitespace (tabs included) become one space, the ends are stripped, and lines
  left empty are skipped;
- book/notes.md: every blockquote line (`> ...`) is a transcribed line; the `>` marker, a trailing `\\`
  (a Markdown hard line break, which keeps the page's lines apart when rendered) and one backslash that
  escapes Markdown punctuation at the start of the line (`\\*`, `\\-`, which would otherwise start a
  list) are removed, then whitespace is normalised as above.
Blockquotes in notes.md are used for the transcription and for nothing else.
"""
import os
import re
from pathlib import Path

import pytest

import nb

ROOT = nb.ROOT
# The transcription of the handwritten page lives beside the checkout (../shared/notes), not in it.
NOTES = Path(os.environ.get("ANNOTATED_TRANSFORMER_NOTES", ROOT.parent / "shared" / "notes" / "transformer-notes.md"))
PAGE = ROOT / "book" / "notes.md"
LINK = re.compile(r"\[([^\]]+)\]\((\.\./notebooks/(\d\d)_[\w]+\.ipynb)#([^)\s]+)\)")


def normalise(line: str) -> str:
    return " ".join(line.split())


def notes_lines() -> list[str]:
    return [n for n in (normalise(l) for l in NOTES.read_text(encoding="utf-8").splitlines()) if n]


def transcribed_lines(text: str) -> list[tuple[int, str]]:
    """(line number in notes.md, the transcribed line) for every non-empty blockquote line."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith(">"):
            continue
        body = line[1:]
        body = body[1:] if body.startswith(" ") else body
        if body.endswith("\\") and not body.endswith("\\\\"):
            body = body[:-1]
        body = re.sub(r"^\\([*\-+#>])", r"\1", body)
        if normalise(body):
            out.append((number, normalise(body)))
    return out


def heading_slug(title: str) -> str:
    """MyST's anchor for a heading (myst_parser's default_slugify over the heading's text and code, the
    text of links included and math left out)."""
    text = title.strip()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)      # a link contributes its text
    text = re.sub(r"(?<!\\)\$[^$]+\$", "", text)               # math contributes nothing
    text = text.replace("`", "").replace("*", "")             # code keeps its content; emphasis markers go
    return re.sub(r"[^\w\u4e00-\u9fff\- ]", "", text.lower().replace(" ", "-"))


def chapter_slugs(path: Path) -> set[str]:
    """The anchors of a chapter's headings down to level 3 (myst_heading_anchors in _config.yml)."""
    slugs: set[str] = set()
    for cell in nb.read(path).cells:
        if cell.cell_type != "markdown":
            continue
        fenced = False
        for line in cell.source.splitlines():
            if line.startswith("```"):
                fenced = not fenced
            match = re.match(r"^(#{1,3})\s+(.+?)\s*#*\s*$", line)
            if match and not fenced:
                slug, n = heading_slug(match.group(2)), 1
                while slug in slugs:                               # myst makes duplicates unique
                    slug, n = f"{heading_slug(match.group(2))}-{n}", n + 1
                slugs.add(slug)
    return slugs


def test_the_slug_function_matches_myst():
    from myst_parser.mdit_to_docutils.base import default_slugify

    for title in ("Why divide by $\\sqrt{d_k}$?", "The notes' table: one $\\mu$ and one $\\sigma$ per token",
                  "Checked against `torch.nn.MultiheadAttention`", "Why sine *and* cosine"):
        text = re.sub(r"\$[^$]+\$", "", title).replace("`", "").replace("*", "")
        assert heading_slug(title) == default_slugify(text)
    assert heading_slug("Learnable projections $W_q$, $W_k$, $W_v$") == "learnable-projections---"


@pytest.mark.skipif(not NOTES.exists(), reason=f"no transcription of the notes at {NOTES} "
                    "(set ANNOTATED_TRANSFORMER_NOTES to its path)")
def test_every_line_of_the_notes_is_transcribed_in_order():
    want = notes_lines()
    got = transcribed_lines(PAGE.read_text(encoding="utf-8"))
    assert len(want) > 100, "the notes file looks truncated"
    for i, (line, (number, have)) in enumerate(zip(want, got)):
        assert have == line, (f"line {i + 1} of the notes ({line!r}) is transcribed at notes.md:{number} as "
                              f"{have!r}; every line, in order, as written")
    assert len(got) == len(want), (
        f"the notes have {len(want)} non-empty lines, notes.md transcribes {len(got)}: "
        + (f"missing from {want[len(got)]!r} on" if len(got) < len(want) else f"extra from notes.md:{got[len(want)][0]}"))


def blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, the lines up to the next quote block or heading) for every quote block."""
    lines = text.split("\n")
    starts = [i for i, l in enumerate(lines) if l.startswith(">") and (i == 0 or not lines[i - 1].startswith(">"))]
    out = []
    for start in starts:
        end = start
        while end < len(lines) and lines[end].startswith(">"):
            end += 1
        tail = []
        for line in lines[end:]:
            if line.startswith(">") or line.startswith("#"):
                break
            tail.append(line)
        out.append((start + 1, tail))
    return out


def test_every_block_is_linked_to_a_section_or_says_why_not():
    text = PAGE.read_text(encoding="utf-8")
    problems = []
    found = blocks(text)
    assert len(found) > 20
    for number, tail in found:
        after = " ".join(tail)
        if "**Not treated:**" in after:
            reason = after.split("**Not treated:**", 1)[1].strip()
            if len(reason) < 20:
                problems.append(f"notes.md:{number}: 'Not treated' needs a reason")
        elif "**Treated in:**" in after:
            if not LINK.search(after.split("**Treated in:**", 1)[1]):
                problems.append(f"notes.md:{number}: 'Treated in' links to no chapter section")
        else:
            problems.append(f"notes.md:{number}: the block says neither 'Treated in' nor 'Not treated'")
    assert not problems, "\n".join(problems)


def test_every_link_to_a_chapter_section_resolves():
    text = PAGE.read_text(encoding="utf-8")
    broken = []
    for label, target, number, slug in LINK.findall(text):
        path = (PAGE.parent / target).resolve().with_suffix(".py")
        if not path.exists():
            broken.append(f"{target}: no such chapter")
        elif slug not in chapter_slugs(path):
            broken.append(f"{target}#{slug}: no heading with that anchor in {path.name}")
    assert not broken, "\n".join(broken)


def errata_rows() -> list[list[str]]:
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("\n## Errata", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s\-|:]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows[1:]  # the header row


def test_every_erratum_names_a_chapter_and_a_section_that_exist():
    rows = errata_rows()
    assert len(rows) >= 15
    problems = []
    for row in rows:
        shown = row[-1]
        links = LINK.findall(shown)
        if not links:
            problems.append(f"erratum {row[0]!r}: 'shown in' has no link to a chapter section ({shown!r})")
            continue
        for label, target, number, slug in links:
            chapter = re.match(r"chapter (\d+), \*(.+)\*$", label)
            if not chapter or int(chapter.group(1)) != int(number):
                problems.append(f"erratum {row[0]!r}: the link text {label!r} must read 'chapter {int(number)}, *section*'")
            path = (PAGE.parent / target).resolve().with_suffix(".py")
            if slug not in chapter_slugs(path):
                problems.append(f"erratum {row[0]!r}: {path.name} has no heading with the anchor #{slug}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("quote, chapter", [
    ("Software $(Q \\cdot R^T) \\cdot V$ is done to add learnable parameters in the matrices", "01"),
])
def test_an_erratum_quoted_as_written_in_its_chapter(quote, chapter):
    """A chapter that corrects the notes quotes them as they are written, then corrects them."""
    path = next((ROOT / "notebooks").glob(f"{chapter}_*.py"))
    text = "\n".join(c.source for c in nb.read(path).cells if c.cell_type == "markdown")
    assert quote in text
