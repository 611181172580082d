"""Per-epoch batches of training text indices: weighted, shuffled, and (for padded training) grouped by length."""

from __future__ import annotations

import math

import numpy as np


class LengthGroupedBatches:
    """Per-epoch batches: weighted, shuffled, then (with `group`) grouped by length within windows of 16 batches.

    Packed training (no padding) takes the batches as drawn; padded training groups them to pad less.

    Epoch e is a pure function of (seed, e), so a resumed run rebuilds it and skips what it had done.
    """

    def __init__(self, indices: np.ndarray, weights: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int,
                 group: bool = True):
        self.indices, self.weights, self.lengths = indices, weights, lengths
        self.batch_size, self.seed, self.group = batch_size, seed, group

    def epoch(self, e: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, e])
        w = self.weights[self.indices]
        copies = np.floor(w).astype(np.int64) + (rng.random(len(w)) < (w - np.floor(w)))
        items = np.repeat(self.indices, copies)
        rng.shuffle(items)
        if not self.group:
            return [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        # Sorting within a window of 16 batches keeps padding low while batches still mix lengths across
        # windows; wider windows pad less but make each batch more uniform in length.
        window = self.batch_size * 16
        batches: list[np.ndarray] = []
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def expected_batches(self) -> int:
        total = float(self.weights[self.indices].sum())
        return max(1, math.ceil(total / self.batch_size))


