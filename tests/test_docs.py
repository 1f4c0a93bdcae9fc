"""Code the docs show as the library's own is the library's code, line for line.

Every ```python block in README.md and docs/**/*.md says, on the line just before its
fence, what it is:

    `alignlib/losses/dpo.py`:                lines of that file, verbatim (a caption readers see)
    <!-- quote: alignlib/losses/dpo.py -->   the same, unseen in the rendered page
    <!-- example -->                         a usage example (README's <!-- example:start --> too)
    <!-- simplified -->                      a simplified form; the prose around it must say so

A quoted line must equal a line of the named file once leading and trailing whitespace are
stripped. Consecutive quoted lines must be consecutive lines of the file (blank lines
aside), in the same order; a line that is exactly `...` marks a gap. A block with no marker
is held to the same rule against every file under alignlib/ and kernels/, so an unmarked
usage example fails until it is marked.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
SOURCES = ("alignlib", "kernels")
GAP = "..."
MARKER = re.compile(
    r"<!--\s*(quote:\s*(?P<path>\S+)|(?P<kind>example|example:start|simplified))\s*-->"
    r"|`(?P<caption>[\w./-]+\.py)`:"
)


class Block(NamedTuple):
    doc: Path
    fence_line: int  # 1-based line number of the opening fence
    marker: str  # "quote", "example", "simplified" or "" (none)
    path: str  # the quoted file, for "quote"
    lines: list[tuple[int, str]]  # (1-based line number in the doc, text)
    context: str  # the prose just above the block (and above its marker)


def python_blocks(doc: Path, text: str | None = None) -> list[Block]:
    lines = (doc.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() not in ("```python", "```py"):
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append((i + 1, lines[i]))
            i += 1
        above = next((j for j in range(start - 1, -1, -1) if lines[j].strip()), -1)
        match = MARKER.fullmatch(lines[above].strip()) if above >= 0 else None
        marker, path = "", ""
        if match and (match["path"] or match["caption"]):
            marker, path = "quote", match["path"] or match["caption"]
        elif match:
            marker = "simplified" if match["kind"] == "simplified" else "example"
        prose_end = above if match else start
        context = " ".join(lines[max(0, prose_end - 8) : prose_end])
        blocks.append(Block(doc, start + 1, marker, path, body, context))
        i += 1
    return blocks


@cache
def source_lines(path: Path) -> tuple[str, ...]:
    """The file's non-blank lines, stripped."""
    return tuple(s for s in (line.strip() for line in path.read_text().splitlines()) if s)


def segments(block: Block) -> list[list[tuple[int, str]]]:
    """The block's non-blank lines, stripped, split at `...` lines."""
    out: list[list[tuple[int, str]]] = [[]]
    for number, text in block.lines:
        text = text.strip()
        if text == GAP:
            out.append([])
        elif text:
            out[-1].append((number, text))
    return [s for s in out if s]


def check_quote(block: Block, doc_name: str, source: Path, source_name: str) -> list[str]:
    """Problems with a block that quotes `source`: lines not in it, or not consecutive and in order."""
    src = source_lines(source)
    problems = [
        f"{doc_name}:{number}: `{text}` is not a line of {source_name}"
        for segment in segments(block)
        for number, text in segment
        if text not in src
    ]
    if problems:
        return problems
    position = 0  # each segment must start at or after the end of the previous one
    for segment in segments(block):
        texts = [text for _, text in segment]
        n = len(texts)
        starts = [i for i in range(position, len(src) - n + 1) if list(src[i : i + n]) == texts]
        if not starts:
            number, text = segment[0]
            return [
                f"{doc_name}:{number}: the lines from `{text}` on are lines of {source_name}, but not "
                "consecutive and in this order after the block's previous lines "
                "(mark a gap with a `...` line)"
            ]
        position = starts[0] + n
    return []


def check_block(block: Block, root: Path = REPO) -> list[str]:
    """Problems with one block, each as 'doc:line: what is wrong'. root: where the quoted paths start."""
    doc_name = str(block.doc.relative_to(root))
    where = f"{doc_name}:{block.fence_line}"
    if block.marker == "example":
        return []
    if block.marker == "simplified":
        if "simplif" not in block.context.lower():
            return [f"{where}: a block marked simplified needs prose just above it saying it is simplified"]
        return []
    if block.marker == "quote":
        source = root / block.path
        if not source.is_file():
            return [f"{where}: quotes {block.path}, which does not exist"]
        return check_quote(block, doc_name, source, block.path)
    # Unmarked: every line must be somewhere in the library's source.
    every = [p for folder in SOURCES for p in sorted((root / folder).rglob("*.py"))]
    known = set().union(*(source_lines(p) for p in every))
    folders = " or ".join(f"{folder}/" for folder in SOURCES)
    missing = [
        f"{doc_name}:{number}: `{text}` is in no file under {folders}"
        for segment in segments(block)
        for number, text in segment
        if text not in known
    ]
    if missing:
        missing.append(
            f"{where}: the block has no marker; put `PATH`: or <!-- quote: PATH --> (the file it quotes), "
            "<!-- example --> or <!-- simplified --> on the line before its fence"
        )
    return missing


ALL_BLOCKS = [block for doc in DOCS for block in python_blocks(doc)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_code_the_docs_quote_is_the_code(doc):
    problems = [problem for block in python_blocks(doc) for problem in check_block(block)]
    assert not problems, "\n".join(problems)


def test_the_docs_have_python_blocks_to_check():
    assert any(block.marker == "quote" for block in ALL_BLOCKS)
    assert any(block.doc.name == "losses.md" for block in ALL_BLOCKS)


# --- the checker itself, on a made-up library and doc ---------------------------------------

SOURCE = """def loss(r_w, r_l, m, c):
    losses = -F.logsigmoid(r_w - r_l - m)

    if c is not None:
        losses = losses + c * (r_w + r_l) ** 2
    return losses
"""


def run_on(tmp_path: Path, doc_text: str) -> list[str]:
    (tmp_path / "alignlib").mkdir(exist_ok=True)
    (tmp_path / "alignlib" / "loss.py").write_text(SOURCE)
    doc = tmp_path / "doc.md"
    doc.write_text(doc_text)
    return [problem for block in python_blocks(doc) for problem in check_block(block, root=tmp_path)]


QUOTE = "Prose.\n<!-- quote: alignlib/loss.py -->\n```python\n{}```\n"


def test_checker_accepts_exact_lines_and_marked_gaps(tmp_path):
    caption = QUOTE.replace("<!-- quote: alignlib/loss.py -->", "`alignlib/loss.py`:")
    assert run_on(tmp_path, caption.format("if c is not None:\n")) == []
    assert "is not a line" in run_on(tmp_path, caption.format("if c is None:\n"))[0]
    exact = (
        "losses = -F.logsigmoid(r_w - r_l - m)\nif c is not None:\n"
        "    losses = losses + c * (r_w + r_l) ** 2\n"
    )
    assert run_on(tmp_path, QUOTE.format(exact)) == []
    assert run_on(tmp_path, QUOTE.format("def loss(r_w, r_l, m, c):\n...\nreturn losses\n")) == []


def test_checker_names_the_doc_line_and_the_file_of_a_line_not_quoted_verbatim(tmp_path):
    assert run_on(tmp_path, QUOTE.format("losses = -F.logsigmoid(r_w - r_l)\n")) == [
        "doc.md:4: `losses = -F.logsigmoid(r_w - r_l)` is not a line of alignlib/loss.py"
    ]
    assert run_on(tmp_path, QUOTE.replace("loss.py", "gone.py").format("x = 1\n")) == [
        "doc.md:3: quotes alignlib/gone.py, which does not exist"
    ]


def test_checker_refuses_reordered_lines_and_unmarked_gaps(tmp_path):
    reordered = "if c is not None:\nlosses = -F.logsigmoid(r_w - r_l - m)\n"
    assert "not consecutive" in run_on(tmp_path, QUOTE.format(reordered))[0]
    gap = "def loss(r_w, r_l, m, c):\nreturn losses\n"
    assert "not consecutive" in run_on(tmp_path, QUOTE.format(gap))[0]


def test_checker_wants_a_marker_on_an_example_and_a_word_on_a_simplified_block(tmp_path):
    block = "```python\nloss = my_loss(batch)\n```\n"
    problems = run_on(tmp_path, "Some prose.\n\n" + block)
    assert problems[0] == "doc.md:4: `loss = my_loss(batch)` is in no file under alignlib/ or kernels/"
    assert problems[1].startswith("doc.md:3: the block has no marker")
    assert run_on(tmp_path, "Some prose.\n<!-- example -->\n" + block) == []
    assert "needs prose" in run_on(tmp_path, "Some prose.\n<!-- simplified -->\n" + block)[0]
    assert run_on(tmp_path, "A simplified form:\n<!-- simplified -->\n" + block) == []
    unmarked_but_real = "Prose.\n\n```python\nreturn losses\n```\n"
    assert run_on(tmp_path, unmarked_but_real) == []
