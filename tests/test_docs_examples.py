"""Every code example in README.md and docs/*.md runs (Python) or parses (`looplens` command lines).

Python: each ```python block runs on its own, in a fresh namespace, in an empty working directory, as
a reader pasting it would (so every example must define what it uses). A block that is meant to be
read, not run, carries ``<!-- not-run: reason -->`` on the line before its fence; those are counted
and their reasons reported (test_not_run_blocks_are_few_and_give_a_reason), never silently dropped.
``<!-- doc-test: slow -->`` before a block puts its test in the slow tier (it trains or runs studies).

Shell: every ``looplens ...`` (or ``python -m looplens ...``) line of a ```bash block is parsed by the real CLI parser (nothing runs),
so a renamed verb or flag breaks this test instead of a reader's copy-paste.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(not-run|doc-test)\s*:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None = None  # the reason, when marked <!-- not-run: reason -->
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, body = i, m.group(1), []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        block = Block(str(path.relative_to(ROOT)), start + 1, lang, "\n".join(body) + "\n")
        j = start - 1
        while j >= 0 and not lines[j].strip():  # the marker may stand one blank line above
            j -= 1
        k = j
        while k >= 0 and (mark := MARK.match(lines[k].strip())):
            if mark.group(1) == "not-run":
                block.not_run = mark.group(2)
            elif mark.group(2) == "slow":
                block.slow = True
            else:
                raise ValueError(f"{block.id}: unknown marker {lines[k].strip()!r}")
            k -= 1
        blocks.append(block)
    return blocks


BLOCKS = [b for doc in DOCS for b in _blocks(doc)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def _param(block: Block):
    marks = [pytest.mark.slow] if block.slow else []
    return pytest.param(block, id=block.id, marks=marks)


def test_examples_are_found():
    docs = {b.doc for b in PYTHON}
    assert {"README.md", "docs/data.md", "docs/interp.md", "docs/training.md", "docs/analyses.md"} <= docs, docs
    assert len(BASH) >= 10


def test_not_run_blocks_are_few_and_give_a_reason():
    skipped = [b for b in PYTHON if b.not_run is not None]
    for b in skipped:
        assert len(b.not_run) >= 10, f"{b.id}: a not-run marker must say why"
    print(f"{len(PYTHON)} python examples, {len(skipped)} not run:")
    for b in skipped:
        print(f"  {b.id}: {b.not_run}")
    assert len(skipped) <= len(PYTHON) // 4, [b.id for b in skipped]


@pytest.mark.parametrize("block", [_param(b) for b in PYTHON if b.not_run is None])
def test_python_example_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # examples write runs/, datasets/, studies/ relative to the cwd
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = compile(block.code, f"{ROOT / block.doc}:{block.line}", "exec")
    exec(code, {"__name__": "__doc_example__"})


def _command_lines(block: Block) -> list[tuple[int, list[str]]]:
    """(line, argv) of each `looplens` (or `... -m looplens`) command in a bash block, continuation lines joined."""
    out, pending, first = [], "", 0
    for offset, raw in enumerate(block.code.splitlines(), start=1):
        if not pending:
            first = block.line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part, comments=True)
            if words and words[0] == "looplens":
                out.append((first, words[1:]))
            elif "-m" in words and words[words.index("-m") + 1:][:1] == ["looplens"]:  # python / torchrun -m looplens
                out.append((first, words[words.index("-m") + 2:]))
    return out


COMMANDS = [(b, line, argv) for b in BASH for line, argv in _command_lines(b)]


def test_command_lines_are_found():
    verbs = {argv[0] for _, _, argv in COMMANDS if argv}
    assert {"data", "train", "eval", "study", "report", "reproduce", "app"} <= verbs, verbs


@pytest.mark.parametrize(
    "argv", [pytest.param(argv, id=f"{b.doc}:{line}") for b, line, argv in COMMANDS]
)
def test_command_line_parses(argv: list[str], capsys: pytest.CaptureFixture):
    from looplens.analyses.cli import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"`looplens {shlex.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
        raise AssertionError from exit_  # unreachable: pytest.fail raises
    assert callable(getattr(args, "func", None)), argv



def test_ci_runs_exactly_the_readme_test_command():
    quickstart = next(b for b in BASH if b.doc == "README.md")  # the first bash block: the quickstart
    commands = [line.split("#")[0].strip() for line in quickstart.code.splitlines() if line.strip()]
    assert "bash scripts/test.sh" in commands, commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.strip().startswith("#")]
    assert ci[-1] == "bash scripts/test.sh", ".ci/run must end by running README's test command, unchanged"
