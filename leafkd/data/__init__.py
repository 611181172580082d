"""Data: training text sources, documents (the one corpus reader), BEIR retrieval sets, adaptation text."""

from leafkd.data.adaptation import adaptation_text, random_spans, split_pieces
from leafkd.data.beir import RetrievalSet, read_beir
from leafkd.data.documents import Document, corpus_file, join_title, read_documents
from leafkd.data.paths import data_dir
from leafkd.data.sources import Corpus, Source, load_corpus, read_texts, text_hash

__all__ = ["Corpus", "Document", "RetrievalSet", "Source", "adaptation_text", "corpus_file", "data_dir", "join_title",
           "load_corpus", "random_spans", "read_beir", "read_documents", "read_texts", "split_pieces", "text_hash"]
