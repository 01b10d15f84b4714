"""Writes format_chats.jsonl beside this file: short instructions whose replies all take one fixed form,
``ANSWER: <answer> END``, which the default training run (Python sources, no chat) has never seen. Fine-tuning on
them shows a model taking up a response format (docs/finetuning.md). Deterministic: the same file every run.

    python examples/data/make_format_chats.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).with_name("format_chats.jsonl")
PER_TASK = 16
WORDS = ["apple", "river", "python", "window", "garden", "silver", "planet", "candle", "rocket", "forest",
         "bridge", "market", "winter", "castle", "pencil", "orange", "dragon", "ticket", "violin", "jacket",
         "cloud", "stone", "light", "train", "music", "table", "paper", "horse", "ocean", "bread"]
KEYWORDS = [("defines a function", "def"), ("defines a class", "class"), ("starts a loop over items", "for"),
            ("leaves a function with a value", "return"), ("handles an exception", "except"),
            ("brings in a module", "import"), ("tests a condition", "if"), ("does nothing", "pass"),
            ("stops a loop early", "break"), ("makes an anonymous function", "lambda"),
            ("opens a context manager", "with"), ("produces values from a generator", "yield"),
            ("checks a condition while debugging", "assert"), ("deletes a name", "del"),
            ("skips to the next loop iteration", "continue"), ("declares a module-level name in a function", "global")]


def _tasks(rng: random.Random) -> list[Callable[[int], tuple[str, str]]]:
    def word() -> str:
        return rng.choice(WORDS)

    def add(_: int) -> tuple[str, str]:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return f"What is {a} + {b}?", str(a + b)

    def times(_: int) -> tuple[str, str]:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", str(a * b)

    def reverse(_: int) -> tuple[str, str]:
        w = word()
        return f"Reverse the word '{w}'.", w[::-1]

    def upper(_: int) -> tuple[str, str]:
        w = word()
        return f"Write '{w}' in capital letters.", w.upper()

    def length(_: int) -> tuple[str, str]:
        w = word()
        return f"How many letters are in '{w}'?", str(len(w))

    def larger(_: int) -> tuple[str, str]:
        a, b = rng.sample(range(1, 100), 2)
        return f"Which is larger, {a} or {b}?", str(max(a, b))

    def parity(_: int) -> tuple[str, str]:
        n = rng.randint(1, 200)
        return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"

    def first(_: int) -> tuple[str, str]:
        w = word()
        return f"What is the first letter of '{w}'?", w[0]

    def py_len(_: int) -> tuple[str, str]:
        items = [rng.randint(0, 9) for _ in range(rng.randint(1, 6))]
        return f"What does len({items}) return in Python?", str(len(items))

    def keyword(i: int) -> tuple[str, str]:
        what, kw = KEYWORDS[i % len(KEYWORDS)]
        return f"Which Python keyword {what}?", kw

    return [add, times, reverse, upper, length, larger, parity, first, py_len, keyword]


def chats(seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """The conversations in a seeded shuffled order (a fine-tune holds out every 20th record: every task should
    be among them)."""
    rng = random.Random(seed)
    tasks = _tasks(rng)
    out = []
    for i in range(PER_TASK):
        for task in tasks:
            question, answer = task(i)
            out.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": f"ANSWER: {answer} END"}]})
    rng.shuffle(out)
    return out


def render(records: list[dict[str, list[dict[str, str]]]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    OUT.write_text(render(chats()), encoding="utf-8")
    print(f"wrote {OUT} ({len(chats())} conversations)")


if __name__ == "__main__":
    main()
