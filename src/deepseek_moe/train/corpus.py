"""Training text: the embedded CPython stdlib corpus or the user's files, folders and .jsonl, split by name.

A corpus is a list of documents (name, text). Its ``sha256`` covers every name and text (validation text
included), so a run's config.json says exactly what it trained and validated on. Documents go to validation
by hashing their names, so the split does not depend on the order the files were found in; or validation text
is given apart (``val_paths``, ``--val-data``), and then every training document trains.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from deepseek_moe.train.errors import TrainError

STDLIB_LIST = Path(__file__).with_name("stdlib_corpus.txt")
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    source: str  # "stdlib" or the user's paths
    train: tuple[Document, ...]
    val: tuple[Document, ...]
    sha256: str  # over every document's name and text
    list_sha256: str | None = None  # the stdlib list file's hash (stdlib corpus only)
    val_source: str | None = None  # the validation paths, when validation text was given apart

    def describe(self) -> dict[str, object]:
        """What config.json records about the data."""
        out: dict[str, object] = {
            "source": self.source, "sha256": self.sha256, "n_documents": len(self.train) + len(self.val),
            "n_train_documents": len(self.train), "n_val_documents": len(self.val),
            "train_chars": sum(len(d.text) for d in self.train), "val_chars": sum(len(d.text) for d in self.val),
        }
        if self.list_sha256 is not None:
            out["list_sha256"] = self.list_sha256
            out["stdlib_dir"] = stdlib_dir()
        if self.val_source is not None:
            out["val_source"] = self.val_source
        return out


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_paths() -> list[str]:
    """The committed, sorted list of stdlib files (relative paths)."""
    lines = STDLIB_LIST.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def load_stdlib_corpus(val_fraction: float) -> Corpus:
    docs, list_hash, _ = _stdlib_documents()
    return _split("stdlib", docs, val_fraction, list_sha256=list_hash)


def _stdlib_documents() -> tuple[list[Document], str, set[Path]]:
    """The stdlib documents, the list file's hash, and the files read."""
    root = Path(stdlib_dir())
    names = stdlib_paths()
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TrainError(f"the default corpus needs {len(names)} CPython standard-library files under {root}, "
                         f"but {len(missing)} are missing: {shown}. Pass --data PATH to train on your own text")
    docs = [Document(n, _read_text(root / n)) for n in names]
    list_hash = hashlib.sha256(STDLIB_LIST.read_bytes()).hexdigest()
    return docs, list_hash, {(root / n).resolve() for n in names}


def load_corpus(paths: tuple[str, ...], *, text_field: str, val_fraction: float,
                val_paths: tuple[str, ...] = ()) -> Corpus:
    """Text files, folders of them (recursively; binary files there are skipped) and .jsonl files; no
    ``paths``: the stdlib corpus. With ``val_paths`` (read the same way) those are the validation text and all of
    ``paths`` trains; without, ``val_fraction`` of the documents validate, chosen by name."""
    if not val_paths:
        if not paths:
            return load_stdlib_corpus(val_fraction)
        docs, _ = _read_paths(paths, text_field, "data")
        return _split(", ".join(paths), docs, val_fraction)
    list_hash = None
    if paths:
        train, train_files = _read_paths(paths, text_field, "data")
    else:
        train, list_hash, train_files = _stdlib_documents()
    val, val_files = _read_paths(val_paths, text_field, "validation data")
    both = sorted(train_files & val_files)
    if both:
        raise TrainError(f"data file {str(both[0])!r} is both training text (--data) and validation text "
                         f"(--val-data){f' ({len(both)} files in all)' if len(both) > 1 else ''}: keep them apart")
    return Corpus(", ".join(paths) or "stdlib", tuple(train), tuple(val), _digest(train, val), list_hash,
                  val_source=", ".join(val_paths))


def _read_paths(paths: tuple[str, ...], text_field: str, what: str) -> tuple[list[Document], set[Path]]:
    """The non-empty documents under ``paths``, and the files they came from."""
    docs: list[Document] = []
    files: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(p.relative_to(path))]
            for p in found:
                if p.suffix == ".jsonl":
                    docs.extend(_read_jsonl(p, text_field))
                elif not _is_binary(p):
                    docs.append(Document(str(p), _read_text(p)))
                else:
                    continue
                files.add(p.resolve())
        elif path.is_file():
            docs.extend(_read_jsonl(path, text_field) if path.suffix == ".jsonl"
                        else [Document(str(path), _read_text(path))])
            files.add(path.resolve())
        else:
            raise TrainError(f"{what} path {raw!r} does not exist")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise TrainError(f"{what} path(s) {', '.join(map(repr, paths))} hold no text (empty files or folders)")
    return docs, files


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def _is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a cut multi-byte character at the end is fine
    return False


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data[:_SNIFF_BYTES]:
        raise TrainError(f"data file {str(path)!r} looks binary (it contains NUL bytes); pass text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"data file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start})") from e


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}:{i} is not valid JSON: {e.msg}") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise TrainError(f"{path}:{i} has no string field {text_field!r} (set data.text_field)")
        docs.append(Document(f"{path}:{i}", record[text_field]))
    return docs


def _in_val(name: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _digest(docs: list[Document], val: list[Document] | None = None) -> str:
    """Over every name and text; validation text given apart is marked off, so moving a document between the
    two changes the hash."""
    digest = hashlib.sha256()
    for d in docs:
        digest.update(hashlib.sha256(d.name.encode()).digest() + hashlib.sha256(d.text.encode()).digest())
    if val is not None:
        digest.update(b"\0validation\0")
        for d in val:
            digest.update(hashlib.sha256(d.name.encode()).digest() + hashlib.sha256(d.text.encode()).digest())
    return digest.hexdigest()


def _split(source: str, docs: list[Document], val_fraction: float, list_sha256: str | None = None) -> Corpus:
    train = [d for d in docs if not _in_val(d.name, val_fraction)]
    val = [d for d in docs if _in_val(d.name, val_fraction)]
    if not train or not val:
        # Too few documents to split by name: hold out the tail of every document instead.
        train, val = [], []
        for d in docs:
            lines = d.text.splitlines(keepends=True)
            cut = max(1, min(len(lines) - 1, round(len(lines) * (1 - val_fraction))))
            if len(lines) < 2:  # one line: cut by characters
                cut_c = round(len(d.text) * (1 - val_fraction))
                head, tail = d.text[:cut_c], d.text[cut_c:]
            else:
                head, tail = "".join(lines[:cut]), "".join(lines[cut:])
            train.append(Document(d.name, head))
            val.append(Document(d.name + "#val", tail))
    return Corpus(source, tuple(train), tuple(val), _digest(docs), list_sha256)


__all__ = ["Corpus", "Document", "load_corpus", "load_stdlib_corpus", "stdlib_paths", "stdlib_dir"]
