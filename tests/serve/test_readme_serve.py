"""The README's serving block runs as written: the server command, the curl call and the openai client."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from serve_fixtures import build_checkpoint, free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def serving_block() -> str:
    section = README.read_text().split("## Serving", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)  # type: ignore[union-attr]


def test_readme_serving_block_runs(tmp_path: Path) -> None:
    block = serving_block()
    assert 'deepseek-moe serve "$(ls -d runs/*/ | tail -1)" --port 8000' in block and "curl" in block and "OpenAI(" in block
    build_checkpoint(tmp_path / "runs" / "20260101-000000" / "model")
    port = str(free_port())
    script = "set -e\n" + block.replace("8000", port) + "\nkill %1\nwait\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"object":"text_completion"' in out.stdout.replace(" ", "")  # curl's JSON
    assert '"usage"' in out.stdout
