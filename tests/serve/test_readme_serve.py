"""docs/serving.md's shell block runs as written: the server command, the curl call and the openai client."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from serve_fixtures import build_checkpoint, free_port

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "serving.md"
COMMAND = 'deepseek-moe serve "$(ls -d runs/*/ | tail -1)" --port 8000'


def serving_block() -> str:
    """The page's shell block that starts the server and calls it (other blocks may come before it)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", PAGE.read_text(), re.DOTALL | re.MULTILINE)
    return next(b for b in blocks if COMMAND in b and "curl" in b)


def test_readme_serve_command_is_the_tested_one() -> None:
    assert COMMAND in (ROOT / "README.md").read_text()


def test_readme_serving_block_runs(tmp_path: Path) -> None:
    block = serving_block()
    assert "OpenAI(" in block
    build_checkpoint(tmp_path / "runs" / "20260101-000000" / "model")
    port = str(free_port())
    script = "set -e\n" + block.replace("8000", port) + "\nkill %1\nwait\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"object":"text_completion"' in out.stdout.replace(" ", "")  # curl's JSON
    assert '"usage"' in out.stdout
