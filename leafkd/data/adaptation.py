"""Training text from an index's own documents (corpus adaptation).

In asymmetric retrieval the documents are embedded by the teacher anyway, so a student distilled for one index
can train on that index's text. Whole documents teach it the documents; queries are short, so it also needs
short texts of the same domain. Two kinds, written as plain text files that `--data` reads:

- pieces: each document cut at sentence ends ('. ', '? ', '! '); unpunctuated text (no sentence end in more
  than 40 words) in 20-word windows; pieces under 4 words dropped.
- spans: K random word spans of 4-32 words per document, drawn once with a seeded generator (query-sized).

Measured on SciFact, Cranfield and NPL (eval/RESULTS.md): documents + pieces, visited 3x per epoch, plus 4 spans
per document once per epoch keep 99.1% of the teacher's nDCG@10 in asymmetric mode (mean of 4 seeds).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path

from leafkd.data.documents import join_title, read_documents
from leafkd.data.sources import read_texts

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def split_pieces(text: str, window: int = 20, min_words: int = 4) -> list[str]:
    """Sentences of `text`, or `window`-word windows when it has no sentence end in over 40 words."""
    sentences = _SENTENCE_END.split(text.strip())
    if len(sentences) == 1 and len(text.split()) > 40:  # unpunctuated text (NPL's abstracts): fixed windows
        words = text.split()
        sentences = [" ".join(words[i : i + window]) for i in range(0, len(words), window)]
    return [s.strip() for s in sentences if len(s.split()) >= min_words]


def random_spans(docs: Iterable[str], k: int, seed: int | str = 0, min_words: int = 4,
                 max_words: int = 32) -> list[str]:
    """`k` spans per document, each of a uniform length in [min_words, max_words] (capped at the document's
    length) at a uniform start; documents shorter than `min_words` are skipped; duplicates dropped."""
    rng = random.Random(seed)
    spans: dict[str, None] = {}
    for doc in docs:
        words = doc.split()
        if len(words) < min_words:
            continue
        for _ in range(k):
            size = min(rng.randint(min_words, max_words), len(words))
            start = rng.randint(0, len(words) - size)
            spans[" ".join(words[start : start + size])] = None
    return list(spans)


def _titled_texts(source: str | Path) -> list[tuple[str, str]]:
    """(title, text) of each document: a BEIR folder's documents in file order, or any `--data` source's texts
    (untitled)."""
    if Path(source).is_dir():
        return [(d.title, d.text) for d in read_documents(source, keep_empty=True)]
    return [("", t) for t in read_texts(str(source))]


def adaptation_text(source: str | Path, spans: int = 4, seed: int | str = 0) -> tuple[list[str], list[str]]:
    """Pieces and spans of one corpus (see the module docstring), both deduplicated, in a fixed order."""
    docs = _titled_texts(source)
    pieces: dict[str, None] = {}
    for title, text in docs:
        for part in (title, text):
            pieces.update(dict.fromkeys(split_pieces(part)))
    joined = [join_title(title, text) for title, text in docs]
    return list(pieces), random_spans(joined, spans, seed) if spans > 0 else []


