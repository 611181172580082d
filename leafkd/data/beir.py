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


def read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, dict[str, str]], *,
               queries_file: str = "queries.jsonl", corpus_file: str = "corpus.jsonl") -> dict[str, dict[str, int]]:
    """Graded relevance from a ``query-id corpus-id score`` TSV (header optional); ids that are not in the queries
    or the corpus (named in errors as `queries_file`, `corpus_file`) are errors."""
    if not path.exists():
        raise LeafkdError(f"{path}: no such file")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and parts and not parts[-1].lstrip("-").isdigit():
                continue  # header
            if not line.strip():
                continue
            if len(parts) != 3:
                raise LeafkdError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(parts)}")
            qid, did, score = parts
            try:
                grade = int(score)
            except ValueError:
                raise LeafkdError(f"{path}:{lineno}: score {score!r} is not an integer") from None
            if qid not in queries:
                raise LeafkdError(f"{path}:{lineno}: query id {qid!r} is not in {queries_file}")
            if did not in corpus:
                raise LeafkdError(f"{path}:{lineno}: document id {did!r} is not in {corpus_file}")
            qrels.setdefault(qid, {})[did] = grade
    return qrels


def read_beir(folder: str | Path, split: str = "test", *, queries: str | Path | None = None,
              qrels: str | Path | None = None) -> RetrievalSet:
    """Load a BEIR folder's ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` (or a corpus file or folder
    with `queries` and `qrels` named apart); keep only judged queries."""
    folder = Path(folder)
    if not folder.exists():
        raise LeafkdError(f"{folder}: no such folder or file")
    queries_path = Path(queries) if queries is not None else folder / "queries.jsonl"
    qrels_path = Path(qrels) if qrels is not None else folder / "qrels" / f"{split}.tsv"
    if qrels is None and not qrels_path.exists():
        raise LeafkdError(f"{qrels_path}: no such file (a BEIR folder needs qrels/{split}.tsv)")
    corpus = {d.id: {"title": d.title, "text": d.text}
              for d in read_documents(folder, require_ids=True, keep_empty=True)}
    all_queries = {q["_id"]: str(q["text"]) for q in jsonl_records(queries_path, ("_id", "text"))}
    relevance = read_qrels(qrels_path, all_queries, corpus, queries_file=queries_path.name,
                           corpus_file="corpus.jsonl" if folder.is_dir() else folder.name)
    judged = {qid: all_queries[qid] for qid in relevance}
    if not judged:
        raise LeafkdError(f"{qrels_path}: no judged queries")
    if not corpus:
        raise LeafkdError(f"{folder}: no documents")
    name = folder.name if folder.is_dir() else folder.stem
    return RetrievalSet(name, corpus, judged, relevance)


def write_beir_subset(folder: str | Path, out: str | Path, documents: int, split: str = "test") -> Path:
    """A BEIR folder of the first `documents` documents of `folder`, with the queries judged against them and their
    relevance labels (a small real retrieval set: demos, tests). `out` must not hold a different subset."""
    import json

    from leafkd import atomic

    src, out = Path(folder), Path(out)
    lines = (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:documents]
    ids = {str(json.loads(line)["_id"]) for line in lines}
    rows = [r.split("\t") for r in (src / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    rows = [r for r in rows if len(r) >= 3 and r[1] in ids]
    qids = {r[0] for r in rows}
    queries = [q for q in (src / "queries.jsonl").read_text(encoding="utf-8").splitlines()
               if q.strip() and str(json.loads(q)["_id"]) in qids]
    if not queries:
        raise LeafkdError(f"{src}: no judged query among its first {documents} documents")
    corpus_text = "\n".join(lines) + "\n"
    existing = out / "corpus.jsonl"
    if existing.exists() and existing.read_text(encoding="utf-8") != corpus_text:
        raise LeafkdError(f"{out} holds another corpus; give a new folder (nothing was changed)")
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "corpus.jsonl", corpus_text)
    atomic.write_text(out / "queries.jsonl", "\n".join(queries) + "\n")
    atomic.write_text(out / "qrels" / f"{split}.tsv",
                      "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r[:3]) + "\n" for r in rows))
    return out
