"""The documentation's code runs as written.

Every fenced ```python block of README.md and docs/*.md is executed, in order, one namespace
per file (so a later block may use what an earlier one defined, as a reader would), in a
temporary working directory (the blocks may write files). A block is exempt only when the
line right before its fence is an HTML comment, invisible on GitHub:

    <!-- no-run: why it cannot run here (a reason is required) -->
    <!-- requires: torch -->        (runs when the module imports, else the file's test skips)

Exemptions must stay rare: test_exemptions_are_rare caps them. Shell (```bash) and other
blocks are not executed; the README's two newcomer commands are checked to be there.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
DIRECTIVE = re.compile(r"^<!--\s*(no-run|requires):\s*(.*?)\s*-->$")
MAX_EXEMPT = 2   # no-run blocks over all files: each needs something a test machine lacks


def blocks(path):
    """[(line, language, code, directive, argument)] of the file's fenced blocks."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        d = DIRECTIVE.match(before)
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group(1).lower(), m.group(2), d.group(1) if d else None,
                    d.group(2) if d else None))
    return out


def python_blocks(path):
    return [b for b in blocks(path) if b[1] in ("python", "py")]


def test_docs_found():
    assert os.path.exists(DOCS[0]) and python_blocks(DOCS[0]), "README.md has no python block"


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    ran = 0
    for line, _, code, directive, arg in python_blocks(path):
        where = f"{os.path.relpath(path, ROOT)}:{line}"
        if directive == "no-run":
            assert arg, f"{where}: a no-run block must say why"
            continue
        if directive == "requires":
            missing = [m for m in re.split(r"[,\s]+", arg) if m and importlib.util.find_spec(m) is None]
            if missing:
                pytest.skip(f"{where} needs {', '.join(missing)} (not installed); {ran} earlier block(s) ran")
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as e:  # the failure names the file and the block's first line
            raise AssertionError(f"the code block at {where} raised {type(e).__name__}: {e}") from e
        ran += 1


def test_exemptions_are_rare():
    exempt = [(os.path.relpath(p, ROOT), b[0], b[4]) for p in DOCS for b in python_blocks(p) if b[3] == "no-run"]
    assert len(exempt) <= MAX_EXEMPT, f"too many no-run blocks (make them runnable): {exempt}"


def test_directives_are_spelled_right():
    """A misspelt directive would silently run (or not exempt) a block: refuse near-misses."""
    for p in DOCS:
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if re.match(r"^<!--\s*(no[-_ ]?run|requires?)\b", line.strip(), re.I):
                    assert DIRECTIVE.match(line.strip()), f"{os.path.relpath(p, ROOT)}:{i}: malformed {line.strip()!r}"


def test_readme_starts_with_the_two_newcomer_commands():
    first = blocks(DOCS[0])[0]
    assert first[1] == "bash"
    cmds = [c.split("#")[0].strip() for c in first[2].splitlines() if c.strip()]
    assert cmds == ['pip install ".[test]" && python -m stackformer', "python -m pytest -q"], cmds


def test_readme_stays_short():
    assert os.path.getsize(DOCS[0]) < 12 * 1024, "README.md is for users: move details to docs/"
