"""Data: training text sources, documents (the one corpus reader), BEIR retrieval sets, adaptation text."""

from leafkd.data.adaptation import adaptation_text, random_spans, split_pieces
from leafkd.data.beir import RetrievalSet, read_beir
from leafkd.data.documents import (
    Document,
    check_unique_ids,
    corpus_file,
    iter_jsonl,
    join_title,
    jsonl_records,
    read_documents,
)
from leafkd.data.paths import data_dir
from leafkd.data.sources import Corpus, Source, load_corpus, read_texts, text_hash

__all__ = ["Corpus", "Document", "RetrievalSet", "Source", "adaptation_text", "check_unique_ids", "corpus_file",
           "data_dir", "iter_jsonl", "join_title", "jsonl_records", "load_corpus", "random_spans", "read_beir",
           "read_documents", "read_texts", "split_pieces", "text_hash"]
