"""Every Python block of the README and the docs runs as written.

The blocks of one page run in order in one namespace (a later block may use an earlier one's
names), in a fresh working directory. A block that must not run here (it needs a GPU, a trained
run or the network) is preceded by the line ``<!-- docs-test: skip (the reason) -->``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- docs-test: skip \(.+\) -->")
FENCE = re.compile(r"^```python\n(.*?)^```$", flags=re.S | re.M)


def pages() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "assets" not in p.relative_to(ROOT / "docs").parts)
    return [ROOT / "README.md", *docs]


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, runs) of each ```python block."""
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1), not SKIP.fullmatch(before.strip())))
    return out


def test_the_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n<!-- docs-test: skip (needs a GPU) -->\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", True), (7, "y = 2\n", False)]
    assert sum(len(python_blocks(p.read_text())) for p in pages()) >= 10


@pytest.mark.parametrize("page", [p for p in pages() if python_blocks(p.read_text())], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for line, code, runs in blocks:
        if runs:
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
