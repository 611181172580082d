"""The batches a run trains on: each epoch's index batches made into tensors in a background thread.

Texts are tokenised once; a batch is packed (no padding: texts concatenated, attention per text, see
leafkd.runtime.packed) or padded, into pinned memory on CUDA, a few batches ahead of the training step, so
batches can be drawn at random like a naive loop's. Under torchrun each rank takes its contiguous slice of
every global batch (leafkd.runtime.distributed.local_batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from leafkd.runtime import distributed as dist_
from leafkd.runtime.packed import pack
from leafkd.runtime.prefetch import prefetch
from leafkd.runtime.tokens import Tokenized, pad_batch
from leafkd.training.batches import LengthGroupedBatches

Batch = dict[str, Any]


class BatchLoader:
    """Batches from a data position (epoch, batches done in it) on, as `(epoch, position after it, batch)`."""

    def __init__(self, sampler: LengthGroupedBatches, tokens: Tokenized, *, packed: bool, pad_id: int,
                 device: torch.device, graph_shapes: dict[str, Any] | None = None, global_keys: bool = False,
                 on_new_epoch: Callable[[], None] | None = None):
        self.sampler, self.tokens, self.packed, self.pad_id, self.device = sampler, tokens, packed, pad_id, device
        self.graph_shapes = graph_shapes or {}  # `pack`'s layout: bucket, width, filler id, rows
        self.global_keys = global_keys  # distributed in-batch relations span the whole global batch
        self.on_new_epoch = on_new_epoch  # a selection refresh takes effect at an epoch boundary

    def make(self, full: np.ndarray) -> Batch:
        """The tensors of one global batch of text indices (this rank's slice of it)."""
        idx, weight = dist_.local_batch(full)  # this rank's slice of the global batch (all of it: 1 process)
        item: Batch = {"idx": torch.from_numpy(idx), "real_tokens": int(self.tokens.lengths[full].sum()),
                       "n": len(full), "weight": weight}
        if self.packed:
            item["packed"] = pack(self.tokens, idx, **self.graph_shapes)
        else:
            ids, mask = pad_batch(self.tokens, idx, self.pad_id)
            item["ids"], item["mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.global_keys:
            item["full"] = torch.from_numpy(full)
        if self.device.type == "cuda":
            for key in ("idx", "ids", "mask", "packed"):
                if key in item:
                    item[key] = item[key].pin_memory()
        return item

    def stream(self, epoch: int, position: int) -> Iterator[tuple[int, int, Batch]]:
        """Endless: the rest of `epoch` from batch `position`, then the next epochs."""
        while True:
            todo = self.sampler.epoch(epoch)[position:]

            def make(k: int, todo: list[np.ndarray] = todo) -> Batch:
                return self.make(todo[k])

            for done, item in enumerate(prefetch(make, len(todo)), start=1):
                yield epoch, position + done, item
            epoch, position = epoch + 1, 0
            if self.on_new_epoch is not None:
                self.on_new_epoch()
