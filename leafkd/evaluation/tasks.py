"""Evaluation tasks read from local files: BEIR folders for retrieval, TSV pairs for STS (never the hub)."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leafkd.data.beir import read_beir
from leafkd.data.paths import data_dir as find_data_dir
from leafkd.data.sources import join_title
from leafkd.errors import LeafkdError

csv.field_size_limit(sys.maxsize)


# Published MTEB scores (x100) that the harness must reproduce within 0.5 points.
PUBLISHED = {
    "all-MiniLM-L6-v2": {"STSBenchmark": 82.03, "SciFact": 64.51},
    "all-mpnet-base-v2": {"STSBenchmark": 83.42, "SciFact": 65.57},
}


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how to read it."""

    key: str
    name: str
    kind: str  # "retrieval" or "sts"
    path: Path
    split: str = "test"  # qrels split (retrieval) or split-column value to keep (STS; "" keeps all rows)
    score_column: str = "score"
    score_range: tuple[float, float] = (0.0, 5.0)
    queries: Path | None = None  # retrieval: a queries.jsonl and a qrels TSV apart from the corpus at `path`
    qrels: Path | None = None

    @property
    def metric(self) -> str:
        return "ndcg_at_10" if self.kind == "retrieval" else "cosine_spearman"


# Built-in tasks, relative to the data folder.
KNOWN_TASKS: dict[str, dict[str, Any]] = {
    "scifact": {"name": "SciFact", "kind": "retrieval", "path": "beir/scifact"},
    "cranfield": {"name": "Cranfield", "kind": "retrieval", "path": "classic/cranfield"},
    "npl": {"name": "NPL", "kind": "retrieval", "path": "classic/npl"},
    "stsb": {"name": "STSBenchmark", "kind": "sts", "path": "sts/stsbenchmark/test.tsv", "split": ""},
    "sickr": {"name": "SICK-R", "kind": "sts", "path": "sts/sick/sick_r.tsv", "split": "TEST",
              "score_column": "relatedness_score", "score_range": (1.0, 5.0)},
}


DEFAULT_TASKS = tuple(KNOWN_TASKS)


def resolve_tasks(names: Iterable[str], data_dir: str | Path | None = None) -> list[TaskSpec]:
    """Task specs from short names (``scifact``...), BEIR folders, or STS ``.tsv`` files."""
    root = Path(data_dir) if data_dir is not None else None
    specs: list[TaskSpec] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        key = name.lower()
        if key in KNOWN_TASKS:
            info = dict(KNOWN_TASKS[key])
            root = root or find_data_dir()  # only the built-in tasks need the shared data folder
            specs.append(TaskSpec(key=key, name=info.pop("name"), kind=info.pop("kind"),
                                  path=root / info.pop("path"), **info))
            continue
        path = Path(name)
        if path.suffix == ".tsv":
            specs.append(TaskSpec(key=path.stem, name=path.stem, kind="sts", path=path, split=""))
        elif path.is_dir() or "/" in name:
            specs.append(TaskSpec(key=path.name, name=path.name, kind="retrieval", path=path))
        else:
            raise LeafkdError(f"unknown task {name!r} (known: {', '.join(KNOWN_TASKS)}; or a BEIR folder or "
                              f"an STS .tsv file)")
    if not specs:
        raise LeafkdError("no tasks given")
    if len({s.name for s in specs}) != len(specs):
        raise LeafkdError("a task is named twice: " + ", ".join(s.name for s in specs))
    return specs


@dataclass
class RetrievalData:
    """A retrieval task in memory: documents (title + text joined), judged queries, graded qrels."""

    spec: TaskSpec
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]

    @property
    def name(self) -> str:
        return self.spec.name

    def size(self) -> dict[str, int]:
        return {"documents": len(self.doc_ids), "queries": len(self.query_ids),
                "judgements": sum(len(v) for v in self.qrels.values())}


@dataclass
class STSData:
    """An STS task in memory: sentence pairs with gold similarity scores."""

    spec: TaskSpec
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray

    @property
    def name(self) -> str:
        return self.spec.name

    def size(self) -> dict[str, int]:
        return {"pairs": len(self.sentences1)}


TaskData = RetrievalData | STSData


def read_sts(spec: TaskSpec) -> STSData:
    """Read a TSV of pairs with a header (``sentence1``, ``sentence2``, a score column, optional ``split``)."""
    path = spec.path
    if not path.is_file():
        raise LeafkdError(f"{path}: no such file")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None:
                raise LeafkdError(f"{path}: empty file")
            need = ["sentence1", "sentence2", spec.score_column] + (["split"] if spec.split else [])
            missing = [c for c in need if c not in header]
            if missing:
                raise LeafkdError(f"{path}:1: no column {missing[0]!r} in the header (columns: {', '.join(header)})")
            idx = [header.index(c) for c in need]
            for lineno, row in enumerate(reader, 2):
                if not row or row == [""]:
                    continue
                if len(row) != len(header):
                    raise LeafkdError(f"{path}:{lineno}: expected {len(header)} tab-separated columns, got {len(row)}")
                if spec.split and row[idx[3]] != spec.split:
                    continue
                try:
                    score = float(row[idx[2]])
                except ValueError:
                    raise LeafkdError(f"{path}:{lineno}: score {row[idx[2]]!r} is not a number") from None
                if not math.isfinite(score):
                    raise LeafkdError(f"{path}:{lineno}: score {row[idx[2]]!r} is not finite")
                s1.append(row[idx[0]])
                s2.append(row[idx[1]])
                scores.append(score)
    except UnicodeDecodeError as e:
        raise LeafkdError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(scores) < 2:
        where = f" in split {spec.split}" if spec.split else ""
        raise LeafkdError(f"{path}: fewer than 2 sentence pairs{where}")
    return STSData(spec, s1, s2, np.asarray(scores, dtype=np.float64))


def load_task(spec: TaskSpec) -> TaskData:
    """Read one task's data; any problem is a one-line `LeafkdError` naming the file."""
    if spec.kind == "sts":
        return read_sts(spec)
    rs = read_beir(spec.path, spec.split, queries=spec.queries, qrels=spec.qrels)
    doc_ids = list(rs.corpus)
    doc_texts = [join_title(d.get("title"), d.get("text", "")) for d in rs.corpus.values()]
    query_ids = list(rs.queries)
    return RetrievalData(spec, doc_ids, doc_texts, query_ids, [rs.queries[q] for q in query_ids], rs.qrels)


def load_tasks(specs: Sequence[TaskSpec]) -> list[TaskData]:
    return [load_task(s) for s in specs]


