"""Runtime: tokenisation, the packed (unpadded) forward, fast encoding, CUDA graphs, devices and distributed."""

from leafkd.runtime import distributed
from leafkd.runtime.devices import DType, Precision, autocast_dtype, inference_dtype, pick_device
from leafkd.runtime.encode import default_batch_tokens, encode, encode_tokens, use_packed
from leafkd.runtime.graphs import GraphedTrainStep, bucket_tokens, fixed_width
from leafkd.runtime.packed import Attention, Packed, PackedForward, pack, supported, unsupported_reason
from leafkd.runtime.prefetch import prefetch, prefetch_iter
from leafkd.runtime.tokens import Tokenized, max_seq_length, pad_batch, plan_batches, tokenize, tokenized_chunks

__all__ = ["Attention", "DType", "GraphedTrainStep", "Packed", "PackedForward", "Precision", "Tokenized",
           "autocast_dtype", "bucket_tokens", "default_batch_tokens", "distributed", "encode", "encode_tokens",
           "fixed_width", "inference_dtype", "max_seq_length", "pack", "pad_batch", "pick_device", "plan_batches",
           "prefetch", "prefetch_iter", "supported", "tokenize", "tokenized_chunks", "unsupported_reason",
           "use_packed"]
