"""Text sources for training: files named by a spec string ``PATH[#COLUMN][*WEIGHT]``.

- ``.txt``: one text a line;
- ``.jsonl``: a ``text`` field (or ``#FIELD``), with ``title`` prepended when present (BEIR's rule);
- ``.tsv``: a named column of a file with a header (``#COLUMN``, default ``text``), or a 1-based
  column number for a file without one (``glosses.tsv#3``);
- a BEIR folder (holding ``corpus.jsonl``): its documents.

``*WEIGHT`` is how many times, in expectation, each text of that source is seen per training epoch
(0.5: half of them, 2: twice). Texts are deduplicated across sources; the weights of duplicates add up.
"""

from __future__ import annotations

import csv
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leafkd.data.documents import corpus_file, join_title, read_documents
from leafkd.errors import LeafkdError

# A TSV cell may hold a whole document: lift the csv module's default field limit (131072 characters).
csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class Source:
    """One input file (or BEIR folder) and how to read it."""

    path: Path
    column: str | None = None
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str | Source | dict[str, Any]) -> Source:
        """Parse ``PATH[#COLUMN][*WEIGHT]`` (or a TOML table with path/column/weight)."""
        if isinstance(spec, Source):
            return spec
        if isinstance(spec, dict):
            if "path" not in spec:
                raise LeafkdError(f"data source {spec!r} has no 'path'")
            return cls(Path(spec["path"]), spec.get("column"), float(spec.get("weight", 1.0)))
        text = str(spec)
        weight = 1.0
        if "*" in text:
            text, _, w = text.rpartition("*")
            try:
                weight = float(w)
            except ValueError:
                raise LeafkdError(f"data source {spec!r}: weight {w!r} is not a number") from None
        if weight < 0:
            raise LeafkdError(f"data source {spec!r}: weight must be >= 0")
        column = None
        if "#" in text:
            text, _, column = text.rpartition("#")
        return cls(Path(text), column or None, weight)


def text_hash(text: str) -> bytes:
    """16-byte content hash of a text (the identity used for dedup and resume)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _read_tsv(path: Path, column: str | None) -> list[str]:
    """A column of a TSV file: named (the file has a header; default ``text``) or 1-based (no header)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if column is not None and column.isdigit():
            idx = int(column) - 1
            rows = reader
            start = 1
        else:
            try:
                header = next(reader)
            except StopIteration:
                return []
            name = column or "text"
            if name not in header:
                raise LeafkdError(f"{path}: no column {name!r} (columns: {', '.join(header)})")
            idx = header.index(name)
            rows = reader
            start = 2
        out = []
        for lineno, row in enumerate(rows, start):
            if not row:
                continue
            if idx >= len(row) or idx < 0:
                raise LeafkdError(f"{path}:{lineno}: has {len(row)} columns, column {idx + 1} wanted")
            out.append(row[idx])
        return out


def read_texts(source: Source | str) -> list[str]:
    """All texts of one source, stripped, empty ones dropped; errors name the file and line."""
    source = Source.parse(source)
    path = corpus_file(source.path)
    try:
        if path.suffix == ".jsonl":
            docs = read_documents(path, field=source.column or "text", keep_empty=True)
            # a named field is read as it is; the default text field gets its title (BEIR's rule)
            texts = [d.text if source.column else join_title(d.title, d.text) for d in docs]
        elif path.suffix == ".tsv":
            texts = _read_tsv(path, source.column)
        elif path.suffix in (".txt", ""):
            texts = [d.text for d in read_documents(path, keep_empty=True)]
        else:
            raise LeafkdError(f"{path}: unknown format {path.suffix!r} (use .txt, .jsonl, .tsv or a BEIR folder)")
    except UnicodeDecodeError as e:
        raise LeafkdError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LeafkdError(f"{path}: cannot read ({e.strerror})") from None
    return [t.strip() for t in texts if t.strip()]


@dataclass
class Corpus:
    """Unique texts with their per-epoch sampling weights."""

    texts: list[str]
    weights: np.ndarray
    sources: list[dict[str, Any]] = field(default_factory=list)  # per source: path, column, weight, texts

    def __len__(self) -> int:
        return len(self.texts)


def load_corpus(sources: Sequence[str | Source | dict[str, Any]], max_texts: int | None = None,
                seed: int = 0) -> Corpus:
    """Read, deduplicate and weight several sources; optionally keep a seeded sample of `max_texts`."""
    if not sources:
        raise LeafkdError("no data sources given")
    index: dict[str, int] = {}
    texts: list[str] = []
    weights: list[float] = []
    info: list[dict[str, Any]] = []
    for spec in sources:
        source = Source.parse(spec)
        items = read_texts(source)
        info.append({"path": str(source.path), "column": source.column, "weight": source.weight, "texts": len(items)})
        for t in items:
            i = index.get(t)
            if i is None:
                index[t] = len(texts)
                texts.append(t)
                weights.append(source.weight)
            else:
                weights[i] += source.weight
    if not texts:
        raise LeafkdError("the corpus is empty: no non-blank texts in " + ", ".join(str(s["path"]) for s in info))
    w = np.asarray(weights, dtype=np.float64)
    if max_texts is not None and max_texts < len(texts):
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_texts, replace=False))
        texts = [texts[i] for i in keep]
        w = w[keep]
    return Corpus(texts, w, info)
