"""The training corpus: the `--data` sources plus, with `--adapt`, the adaptation text of the target corpora.

Corpus adaptation (leafkd.data.adaptation, the one implementation; `leafkd adapt-text` writes the same text to
files): each adapted corpus adds its documents and their sentence pieces, visited `adapt_weight` times per epoch,
and `adapt_spans` query-sized random spans per document, visited once. The spans are drawn with the seed
"SEED:NAME" (the run's seed, the corpus's folder or file name), as `leafkd adapt-text --seed SEED` draws them.
Texts are deduplicated across everything; the weights of duplicates add up, as between `--data` sources.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from leafkd.data.adaptation import adaptation_text
from leafkd.data.sources import Corpus, Source, load_corpus, read_texts
from leafkd.training.config import TrainConfig

logger = logging.getLogger(__name__)


def training_corpus(cfg: TrainConfig) -> Corpus | None:
    """The texts to train on with their weights per epoch (None: no --data or --adapt, a store's texts are used)."""
    corpus = load_corpus(cfg.data, cfg.max_texts, cfg.seed) if cfg.data else None
    if not cfg.adapt:
        return corpus
    documents: list[tuple[str, list[str], float]] = []
    spans: list[tuple[str, list[str], float]] = []
    for spec in cfg.adapt:
        # A source may carry a column; its weight is adapt_weight (as `leafkd adapt-text --weight`).
        source = Source.parse(spec)
        path = f"{source.path}#{source.column}" if source.column else str(source.path)
        name = source.path.name if source.path.is_dir() else source.path.stem
        docs = read_texts(path)
        pieces, cut = adaptation_text(path, cfg.adapt_spans, seed=f"{cfg.seed}:{name}")
        logger.info(f"adapting to {path}: {len(docs)} documents and {len(pieces)} sentence pieces "
                    f"(x{cfg.adapt_weight:g}), {len(cut)} random spans")
        documents += [(f"{path} (documents)", docs, cfg.adapt_weight), (f"{path} (pieces)", pieces, cfg.adapt_weight)]
        spans.append((f"{path} (spans)", cut, 1.0))  # visited once: they add variety, not repetition
    return with_texts(corpus, documents + spans)


def with_texts(corpus: Corpus | None, groups: Sequence[tuple[str, list[str], float]]) -> Corpus:
    """`corpus` (or nothing) plus each group of (name, texts, weight), deduplicated as `load_corpus` does."""
    texts = list(corpus.texts) if corpus is not None else []
    weights = [float(w) for w in corpus.weights] if corpus is not None else []
    sources = list(corpus.sources) if corpus is not None else []
    index = {t: i for i, t in enumerate(texts)}
    for name, group, weight in groups:
        sources.append({"path": name, "column": None, "weight": weight, "texts": len(group)})
        for t in group:
            i = index.setdefault(t, len(texts))
            if i == len(texts):
                texts.append(t)
                weights.append(weight)
            else:
                weights[i] += weight
    return Corpus(texts, np.asarray(weights, dtype=np.float64), sources)


def bank_sources(cfg: TrainConfig) -> list[str]:
    """The sources whose texts form the bank: --bank-data, and with --bank-from-adapt the adapted corpora."""
    return [*cfg.bank_data, *(cfg.adapt if cfg.bank_from_adapt else [])]
