"""Every relative link in README.md and docs/*.md points at a file that exists and, with a #fragment, at a heading
of that page (GitHub's anchors); every file path and every `deepseek_moe.` name the pages mention exists, so a
file moved or a function renamed fails here instead of leaving the documentation wrong."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FILE = re.compile(r"(?<![\w/.<-])((?:[\w.-]+/)+[\w.-]+\.(?:py|cpp|md|json|png))\b")
NAME = re.compile(r"\bdeepseek_moe(?:\.\w+)+\(?")  # a trailing "(": it is called, so must be callable


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link or heading means one."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2, ... on repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), target) for page in PAGES
            for target in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", target)]


def test_anchor_rules() -> None:
    doc = "# Training state: `state/step-N/`\n```bash\n# not a heading\n```\n## The ablation, run here\n## Memory\n## Memory\n"
    assert anchors(doc) == {"training-state-statestep-n", "the-ablation-run-here", "memory", "memory-1"}
    assert LINK.findall(prose("see [a](x.md#y), ![p](img/p.png) and `[c](not.md)`")) == ["x.md#y", "img/p.png"]


def test_pages_link_to_each_other() -> None:
    assert ("README.md", "docs/checkpoints.md") in links()


@pytest.mark.parametrize(("page", "target"), links(), ids=[f"{p}->{t}" for p, t in links()])
def test_link_resolves(page: str, target: str) -> None:
    path, _, fragment = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page}: link {target!r}: {file.relative_to(ROOT)} does not exist"
    if fragment:
        assert file.suffix == ".md", f"{page}: link {target!r}: a #fragment on a file that is not a page"
        assert fragment in anchors(file.read_text()), (
            f"{page}: link {target!r}: no heading of {file.relative_to(ROOT)} has the id {fragment!r}")


def mentions(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    return sorted({(page.relative_to(ROOT).as_posix(), m) for page in PAGES for m in pattern.findall(page.read_text())})


def test_mention_patterns() -> None:
    text = "`kernels/qgemm.cpp`, runs/<timestamp>/model, python benchmarks/serve.py, `deepseek_moe.train.run(cfg)`."
    assert FILE.findall(text) == ["kernels/qgemm.cpp", "benchmarks/serve.py"]
    assert NAME.findall(text) == ["deepseek_moe.train.run("]


@pytest.mark.parametrize(("page", "path"), mentions(FILE), ids=[f"{p}:{m}" for p, m in mentions(FILE)])
def test_mentioned_file_exists(page: str, path: str) -> None:
    # a path is written from the repository root, from the page's folder, or inside the package
    bases = [ROOT, (ROOT / page).parent, ROOT / "src" / "deepseek_moe", ROOT / "src"]
    assert any((base / path).exists() for base in bases), f"{page} mentions {path}, which does not exist"


@pytest.mark.parametrize(("page", "name"), mentions(NAME), ids=[f"{p}:{m}" for p, m in mentions(NAME)])
def test_mentioned_name_exists(page: str, name: str) -> None:
    called = name.endswith("(")
    parts = name.rstrip("(").split(".")
    obj = importlib.import_module(parts[0])
    for i, attr in enumerate(parts[1:], start=2):
        # what `a.b.c` means in Python: the attribute when the package has one (deepseek_moe.finetune.run is the
        # function the package exports, not its module), else the submodule
        if not hasattr(obj, attr):
            try:
                importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                pass
        assert hasattr(obj, attr), f"{page} mentions {name}: {'.'.join(parts[:i - 1])} has no {attr!r}"
        obj = getattr(obj, attr)
    assert not called or callable(obj), f"{page} calls {name.rstrip('(')}(...), which is a {type(obj).__name__}"
