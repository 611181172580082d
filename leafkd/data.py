"""Reading text corpora and BEIR-layout retrieval sets.

Text sources are files named by a spec string ``PATH[#COLUMN][*WEIGHT]``:

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
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leafkd.errors import LeafkdError

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class Source:
    """One input file (or BEIR folder) and how to read it."""

    path: Path
    column: str | None = None
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: "str | Source | dict") -> "Source":
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


def join_title(title: str | None, text: str) -> str:
    """BEIR's document text: title and body joined by a space."""
    title = (title or "").strip()
    text = (text or "").strip()
    return f"{title} {text}".strip() if title else text


def iter_jsonl(path: Path):
    """(line number, object) for each non-blank line; a malformed line is a one-line error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise LeafkdError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None


def _read_jsonl(path: Path, field_name: str | None) -> list[str]:
    key = field_name or "text"
    out: list[str] = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or key not in obj:
            raise LeafkdError(f"{path}:{lineno}: no {key!r} field")
        value = obj[key]
        if not isinstance(value, str):
            raise LeafkdError(f"{path}:{lineno}: field {key!r} is not a string")
        title = obj.get("title") if field_name is None else None
        out.append(join_title(title if isinstance(title, str) else None, value))
    return out


def _read_tsv(path: Path, column: str | None) -> list[str]:
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


def corpus_file(path: str | Path) -> Path:
    """The file to read for a corpus path: a BEIR folder means its corpus.jsonl; missing paths are errors."""
    path = Path(path)
    if path.is_dir():
        if not (path / "corpus.jsonl").exists():
            raise LeafkdError(f"{path}: a folder, but not a BEIR corpus (no corpus.jsonl)")
        path = path / "corpus.jsonl"
    if not path.exists():
        raise LeafkdError(f"{path}: no such file")
    return path


def read_texts(source: Source | str) -> list[str]:
    """All texts of one source, stripped, empty ones dropped; errors name the file and line."""
    source = Source.parse(source)
    path = corpus_file(source.path)
    try:
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path, source.column)
        elif path.suffix == ".tsv":
            texts = _read_tsv(path, source.column)
        elif path.suffix in (".txt", ""):
            with open(path, encoding="utf-8") as f:
                texts = f.read().splitlines()
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
    sources: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def load_corpus(sources: list, max_texts: int | None = None, seed: int = 0) -> Corpus:
    """Read, deduplicate and weight several sources; optionally keep a seeded sample of `max_texts`."""
    if not sources:
        raise LeafkdError("no data sources given")
    index: dict[str, int] = {}
    texts: list[str] = []
    weights: list[float] = []
    info = []
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


@dataclass
class RetrievalSet:
    """A BEIR-layout retrieval set: documents, judged queries and graded relevance."""

    name: str
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    def doc_texts(self) -> list[str]:
        return [join_title(d.get("title"), d.get("text", "")) for d in self.corpus.values()]


def _jsonl_records(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        raise LeafkdError(f"{path}: no such file")
    out = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise LeafkdError(f"{path}:{lineno}: not a JSON object")
        for key in required:
            if key not in obj:
                raise LeafkdError(f"{path}:{lineno}: no {key!r} field")
        obj["_id"] = str(obj["_id"])
        out.append(obj)
    return out


def read_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """Load ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``; keep only judged queries."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeafkdError(f"{folder}: no such folder")
    corpus = {}
    for d in _jsonl_records(folder / "corpus.jsonl", ("_id", "text")):
        corpus[d["_id"]] = {"title": str(d.get("title") or ""), "text": str(d.get("text") or "")}
    all_queries = {q["_id"]: str(q["text"]) for q in _jsonl_records(folder / "queries.jsonl", ("_id", "text"))}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise LeafkdError(f"{qrels_path}: no such file (a BEIR folder needs qrels/{split}.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and parts and not parts[-1].lstrip("-").isdigit():
                continue  # header
            if not line.strip():
                continue
            if len(parts) != 3:
                raise LeafkdError(f"{qrels_path}:{lineno}: expected 3 tab-separated columns, got {len(parts)}")
            qid, did, score = parts
            try:
                grade = int(score)
            except ValueError:
                raise LeafkdError(f"{qrels_path}:{lineno}: score {score!r} is not an integer") from None
            if qid not in all_queries:
                raise LeafkdError(f"{qrels_path}:{lineno}: query id {qid!r} is not in queries.jsonl")
            if did not in corpus:
                raise LeafkdError(f"{qrels_path}:{lineno}: document id {did!r} is not in corpus.jsonl")
            qrels.setdefault(qid, {})[did] = grade
    queries = {qid: all_queries[qid] for qid in qrels}
    if not queries:
        raise LeafkdError(f"{qrels_path}: no judged queries")
    if not corpus:
        raise LeafkdError(f"{folder / 'corpus.jsonl'}: no documents")
    return RetrievalSet(folder.name, corpus, queries, qrels)
