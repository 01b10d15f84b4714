"""Every Python block in README.md and docs/*.md runs (nothing in the documentation that doesn't), and the README
stays a front page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250  # the manual, the benchmark log and the design notes live in docs/


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


# (page, index in that page, code): a failure names e.g. docs/checkpoints.md[python block 1]
BLOCKS = [(page.relative_to(ROOT).as_posix(), i, code)
          for page in PAGES for i, code in enumerate(python_blocks(page.read_text()))]


def test_blocks_are_found() -> None:
    pages = {name for name, _, _ in BLOCKS}
    # the pages whose examples are code: if one of these loses its blocks, the block pattern broke or they were cut
    assert {"README.md", "docs/layer.md", "docs/checkpoints.md", "docs/quantisation.md", "docs/export.md",
            "docs/finetuning.md"} <= pages
    assert sum(name == "README.md" for name, _, _ in BLOCKS) >= 2


def test_python_blocks_pattern() -> None:
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = '```'\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = '```'\n"]


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS, ids=[f"{name}[{i}]" for name, i, _ in BLOCKS])
def test_block_runs(page: str, index: int, code: str) -> None:
    exec(compile(code, f"{page}[python block {index}]", "exec"), {})


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into a docs/ page"
