"""BEIR-layout retrieval sets: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leafkd.data.documents import join_title, jsonl_records, read_documents
from leafkd.errors import LeafkdError


@dataclass
class RetrievalSet:
    """A BEIR-layout retrieval set: documents, judged queries and graded relevance."""

    name: str
    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def doc_ids(self) -> list[str]:
        """Document ids in corpus order."""
        return list(self.corpus)

    def doc_texts(self) -> list[str]:
        """Document texts (title and body joined) in corpus order."""
        return [join_title(d.get("title"), d.get("text", "")) for d in self.corpus.values()]


def read_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """Load ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``; keep only judged queries."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeafkdError(f"{folder}: no such folder")
    corpus: dict[str, dict[str, str]] = {}
    if not (folder / "corpus.jsonl").exists():
        raise LeafkdError(f"{folder / 'corpus.jsonl'}: no such file")
    for d in read_documents(folder, require_ids=True, keep_empty=True):
        corpus[d.id] = {"title": d.title, "text": d.text}
    all_queries = {q["_id"]: str(q["text"]) for q in jsonl_records(folder / "queries.jsonl", ("_id", "text"))}
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
