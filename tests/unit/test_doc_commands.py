"""Every `deepseek-moe ...` command in the shell blocks of README.md and docs/*.md parses with today's CLI, and
every new-run `deepseek-moe train` command resolves to a valid TrainConfig (its --set fields exist), so a renamed
flag or config field fails here instead of in a reader's terminal. (Running them is the job of the tests that
drive each command; these are minutes long.)"""

import re
import shlex
from pathlib import Path

import pytest

from deepseek_moe.cli.main import build_parser
from deepseek_moe.train.command import build_config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(text: str) -> list[str]:
    """The `deepseek-moe` lines of the page's bash blocks, without comments or a trailing `&`."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            if line.startswith("deepseek-moe "):
                out.append(shlex.split(line, comments=True)[1:])
    return [" ".join(shlex.quote(a) for a in argv if a != "&") for argv in out]


COMMANDS = sorted({(page.relative_to(ROOT).as_posix(), cmd) for page in PAGES for cmd in commands(page.read_text())})


def test_commands_are_found() -> None:
    assert commands("```bash\ndeepseek-moe serve x --port 8000 &   # see --help\nls\n```\n") == ["serve x --port 8000"]
    used = {cmd.split()[0] for _, cmd in COMMANDS}
    assert {"train", "generate", "quantize", "serve", "export", "ablate", "routes"} <= used


@pytest.mark.parametrize(("page", "cmd"), COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_command_parses(page: str, cmd: str) -> None:
    try:
        args = build_parser().parse_args(shlex.split(cmd))
    except SystemExit as e:  # argparse has printed what it refused
        raise AssertionError(f"{page}: `deepseek-moe {cmd}` does not parse") from e
    if args.command == "train" and not args.resume:  # a resumed run's config is read from its directory
        build_config(args)
