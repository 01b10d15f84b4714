"""Writes format_chats.jsonl beside this file: short instructions whose replies all take one fixed form, a JSON
object with one key, ``{"answer": "<answer>"}``, which the default training run (Python sources, no chat) has never
given as a reply. Fine-tuning on them shows a model taking up a response format (docs/finetuning.md).
Deterministic: the same file every run.

The frame is JSON rather than words such as ``ANSWER: ... END`` because of the base's tokenizer (4096 tokens learnt
on Python): ``ANSWER`` and ``END`` are spelt in capital letters of one or two characters (`` A``, ``N``, ``S``, ``W``,
``ER`` and `` E``, ``N``, ``D``) that the model confuses with ``AND``, while ``{"``, ``":``, `` "`` and ``"}`` are
pieces of code it has seen closing many strings and dicts.

Most questions are about a line of Python given in the question, and their answer is a name or value copied from
it (the function a ``def`` defines, the module an ``import`` loads, ...): a small model trained on code can
point at the right piece of the line, so what it has to learn is the frame around it. A few ask for a word of a
quoted phrase, the larger of two numbers, or whether a number is even. Each kind of question is asked in several
wordings. The names come from NAMES, MODULES and WORDS; the held-out prompts of docs/finetuning.md use names that
are in none of them.

    python examples/data/make_format_chats.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).with_name("format_chats.jsonl")
PER_TASK = 20
NAMES = ["load_config", "parse_args", "send_email", "total", "counter", "build_index", "user_name", "get_item",
         "main", "merge_lists", "render_page", "max_size", "sort_keys", "find_path", "read_lines", "clean_text",
         "start_server", "limit", "retry_count", "open_file", "split_words", "draw", "score", "hash_value",
         "update_cache", "run_tests", "make_plot", "label", "offset", "fetch_data"]
CLASSES = ["Parser", "Node", "Window", "Account", "Matrix", "Player", "Request", "Timer", "Config", "Shape",
           "Queue", "Logger", "Client", "Vector", "Token", "Engine"]
MODULES = ["os", "sys", "re", "math", "random", "time", "socket", "string", "shutil", "struct", "pickle", "copy",
           "heapq", "bisect", "array", "glob"]
ARGS = ["x", "path", "items", "name", "self", "data", "n", "key", "value", "text"]
WORDS = ["apple", "river", "window", "garden", "silver", "planet", "candle", "rocket", "forest", "bridge",
         "market", "winter", "castle", "pencil", "orange", "dragon", "ticket", "violin", "jacket", "cloud"]


def _tasks(rng: random.Random) -> list[Callable[[], tuple[str, str]]]:
    def pick(options: list[str], **fields: str) -> str:
        return rng.choice(options).format(**fields)

    def function() -> tuple[str, str]:
        name, arg = rng.choice(NAMES), rng.choice(ARGS)
        return pick(["What is the name of the function in `def {n}({a}):`?",
                     "Which function does `def {n}({a}):` define?",
                     "Name the function defined by `def {n}({a}):`."], n=name, a=arg), name

    def module() -> tuple[str, str]:
        name = rng.choice(MODULES)
        return pick(["Which module does `import {m}` load?", "What module is imported by `import {m}`?",
                     "Name the module in `import {m}`."], m=name), name

    def klass() -> tuple[str, str]:
        name = rng.choice(CLASSES)
        return pick(["What class does `class {c}:` define?", "Name the class in `class {c}:`.",
                     "Which class is defined by `class {c}:`?"], c=name), name

    def variable() -> tuple[str, str]:
        name, value = rng.choice(NAMES), str(rng.randint(0, 99))
        return pick(["Which variable is set in `{n} = {v}`?", "What name is assigned in `{n} = {v}`?",
                     "Name the variable in `{n} = {v}`."], n=name, v=value), name

    def value() -> tuple[str, str]:
        name, number = rng.choice(NAMES), str(rng.randint(0, 99))
        return pick(["What value does `{n} = {v}` assign?", "After `{n} = {v}`, what is {n}?",
                     "What is {n} set to by `{n} = {v}`?"], n=name, v=number), number

    def argument() -> tuple[str, str]:
        name, arg = rng.choice(NAMES), rng.choice(ARGS)
        return pick(["What is the argument of `def {n}({a}):`?", "Which parameter does `def {n}({a}):` take?",
                     "Name the parameter of `def {n}({a}):`."], n=name, a=arg), arg

    def first_word() -> tuple[str, str]:
        words = rng.sample(WORDS, 3)
        return pick(["What is the first word of '{p}'?", "Which word comes first in '{p}'?"],
                    p=" ".join(words)), words[0]

    def last_word() -> tuple[str, str]:
        words = rng.sample(WORDS, 3)
        return pick(["What is the last word of '{p}'?", "Which word comes last in '{p}'?"],
                    p=" ".join(words)), words[-1]

    def larger() -> tuple[str, str]:
        a, b = rng.sample(range(1, 100), 2)
        return pick(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"],
                    a=str(a), b=str(b)), str(max(a, b))

    def parity() -> tuple[str, str]:
        n = rng.randint(1, 200)
        return pick(["Is {n} even or odd?", "Is the number {n} odd or even?"], n=str(n)), \
            "even" if n % 2 == 0 else "odd"

    return [function, module, klass, variable, value, argument, first_word, last_word, larger, parity]


def chats(seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """The conversations in a seeded shuffled order (a fine-tune holds out every 20th record: every task should
    be among them)."""
    rng = random.Random(seed)
    tasks = _tasks(rng)
    out = []
    for _ in range(PER_TASK):
        for task in tasks:
            question, answer = task()
            out.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": json.dumps({"answer": answer})}]})
    rng.shuffle(out)
    return out


def render(records: list[dict[str, list[dict[str, str]]]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    OUT.write_text(render(chats()), encoding="utf-8")
    print(f"wrote {OUT} ({len(chats())} conversations)")


if __name__ == "__main__":
    main()
