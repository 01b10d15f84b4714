"""``--adapter [NAME=]PATH``, as ``serve`` and ``generate`` both take it: a LoRA adapter directory and the name
requests select it by (serve), which defaults to the directory's name."""

from __future__ import annotations

from pathlib import Path

from deepseek_moe.cli.main import UsageError


def adapter_spec(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` (text without ``=``, or an existing path that has one) is
    named after its directory."""
    if "=" in text and not Path(text).exists():
        name, _, where = text.partition("=")
        if not name.strip() or not where:
            raise UsageError(f"--adapter {text!r}: expected NAME=PATH (a name, then the adapter's directory)")
        return name.strip(), Path(where)
    path = Path(text)
    name = path.resolve().name
    if not name:
        raise UsageError(f"--adapter {text!r}: no directory name to call it by; use NAME=PATH")
    return name, path


def adapter_specs(texts: list[str]) -> list[tuple[str, Path]]:
    return [adapter_spec(t) for t in texts]
