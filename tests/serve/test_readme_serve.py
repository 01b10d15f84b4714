"""docs/serving.md's shell block runs as written: the server command, the curl call and the openai client."""

from __future__ import annotations

import json
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
    """The page's shell block that starts the server and calls it (other blocks may come before it), then every
    later block that calls that server ("with the server above") without starting one of its own."""
    blocks = re.findall(r"^```bash\n(.*?)^```", PAGE.read_text(), re.DOTALL | re.MULTILINE)
    first = next(i for i, b in enumerate(blocks) if COMMAND in b and "curl" in b)
    later = [b for b in blocks[first + 1:] if "127.0.0.1:8000" in b and "deepseek-moe serve" not in b]
    return "\n".join([blocks[first], *later])


def test_readme_serve_command_is_the_tested_one() -> None:
    assert COMMAND in (ROOT / "README.md").read_text()


def test_readme_serving_block_runs(tmp_path: Path) -> None:
    block = serving_block()
    assert "OpenAI(" in block
    build_checkpoint(tmp_path / "runs" / "20260101-000000" / "model")
    port = str(free_port())
    script = "set -e\n" + block.replace("8000", port) + "\nkill %1\nwait\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"object":"text_completion"' in out.stdout.replace(" ", "")  # curl's JSON
    assert '"usage"' in out.stdout
    assert '"expert_tokens"' in out.stdout  # the page's /stats block ran too
    assert '"token_logprobs"' in out.stdout  # the logprobs example ran too
    assert "prompt logprob -" in out.stdout  # echo with max_tokens 0 scored the prompt
    assert "choices [0, 1, 2] usage" in out.stdout  # n and seed: the client's asserts held
    for line in out.stdout.splitlines():  # the structured-output examples: a reply that stopped parses
        if line.startswith("{") and '"chat.completion"' in line.replace(" ", ""):
            choice = json.loads(line)["choices"][0]
            if choice["finish_reason"] == "stop":
                json.loads(choice["message"]["content"])
