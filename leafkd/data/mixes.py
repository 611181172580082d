"""The generic training mix: the unlabeled text the recipes train on beside a corpus (`distill`'s default `--data`).

All of ``DATA/train`` (see ../shared/data/README.md): questions, WordNet glosses and examples, Wikipedia leads and
paragraphs, and the NLTK sentence sets — short queries, definitions, sentences and passages, no labels, nothing of
the evaluation sets. The same sources as examples/flagship.toml.
"""

from __future__ import annotations

from pathlib import Path

from leafkd.data.paths import data_dir
from leafkd.errors import LeafkdError

# Relative to the data folder; `#3` is the gloss column of the WordNet table.
GENERIC_SOURCES = (
    "train/questions.tsv",
    "train/wordnet_glosses.tsv#3",
    "train/wordnet_examples.txt",
    "train/wiki_summaries.jsonl",
    "train/wiki_paragraphs.jsonl",
    "train/sentences/inaugural.txt",
    "train/sentences/movie_reviews.txt",
    "train/sentences/product_reviews.txt",
    "train/sentences/pros_cons.txt",
    "train/sentences/sentence_polarity.txt",
    "train/sentences/state_union.txt",
    "train/sentences/subjectivity.txt",
)


def generic_mix(root: str | Path | None = None) -> list[str]:
    """The generic mix's sources (``PATH[#COLUMN]`` specs) under the data folder; a one-line error if it is absent."""
    folder = data_dir(root)
    assert folder is not None  # required=True raises instead
    missing = [s for s in GENERIC_SOURCES if not (folder / s.split("#")[0]).exists()]
    if missing:
        raise LeafkdError(f"{folder}: the generic training mix is incomplete (missing {', '.join(missing[:3])}); "
                          "give your own --data")
    return [f"{folder / s.split('#')[0]}" + (f"#{s.split('#')[1]}" if "#" in s else "") for s in GENERIC_SOURCES]
