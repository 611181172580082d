"""How close can a 384-d student get to a 768-d teacher through a linear projection, with a perfect encoder?

    python eval/projection_bound.py --teacher models/all-mpnet-base-v2      # ~2 min on 2 CPU cores

The student's Dense 384 -> 768 puts every output in one 384-dimensional subspace, and Normalize keeps the
direction, so its best possible cosine to a unit teacher vector t is ||P t||, P the projection onto that subspace.
This embeds a seeded sample of the flagship's training texts with the teacher (WordNet glosses, questions,
Wikipedia paragraphs), takes the best rank-k subspace of 80% of them (their top right singular vectors) and
reports ||P t|| on the other 20%: an upper bound on the held-out cosine at each rank. (A subspace fitted on a few
thousand vectors generalises worse than one fitted on all, so the bound is, if anything, low.)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sample_texts(data_dir: Path, seed: int = 0) -> list[str]:
    """A seeded sample of three of the flagship's sources, read as training reads them (leafkd.data)."""
    from leafkd.data.sources import read_texts

    rng = random.Random(seed)
    train = data_dir / "train"
    wiki = read_texts(str(train / "wiki_paragraphs.jsonl"))
    glosses = read_texts(str(train / "wordnet_glosses.tsv#3"))
    questions = read_texts(str(train / "questions.tsv"))
    return rng.sample(wiki, 600) + rng.sample(glosses, 1200) + rng.sample(questions, 1200)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(REPO / "models" / "all-mpnet-base-v2"))
    p.add_argument("--data-dir", default=os.environ.get("LEAFKD_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--ranks", default="64,128,256,384,512")
    args = p.parse_args()
    if not (Path(args.teacher) / "modules.json").is_file():
        sys.exit(f"error: --teacher {args.teacher}: not a sentence-transformers model folder")
    if not (Path(args.data_dir) / "train").is_dir():
        sys.exit(f"error: --data-dir {args.data_dir}: no train/ folder in it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    texts = sample_texts(Path(args.data_dir))
    teacher = SentenceTransformer(args.teacher, device="cpu")
    teacher.max_seq_length = 256
    x = teacher.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    order = np.random.default_rng(0).permutation(len(x))  # mix the three kinds before the 80/20 split
    x = x[order]
    cut = int(0.8 * len(x))
    fit, held = x[:cut], x[cut:]
    _, _, vt = np.linalg.svd(fit, full_matrices=False)
    print(f"{len(fit)} teacher vectors fit the subspace, {len(held)} held out ({x.shape[1]}-d teacher)")
    print("| rank | mean norm of P t (bound on the mean cosine) | 5th percentile |")
    print("|---:|---:|---:|")
    for k in map(int, args.ranks.split(",")):
        norms = np.linalg.norm(held @ vt[:k].T, axis=1)
        print(f"| {k} | {norms.mean():.4f} | {np.percentile(norms, 5):.4f} |")


if __name__ == "__main__":
    sys.exit(main())
