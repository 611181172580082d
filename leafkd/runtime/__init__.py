"""Runtime: tokenisation, the packed (unpadded) forward, fast encoding, CUDA graphs, devices and distributed."""

from leafkd.runtime.devices import autocast_dtype, inference_dtype, pick_device
from leafkd.runtime.encode import encode, encode_tokens
from leafkd.runtime.packed import Packed, PackedForward, pack
from leafkd.runtime.tokens import Tokenized, tokenize

__all__ = ["Packed", "PackedForward", "Tokenized", "autocast_dtype", "encode", "encode_tokens", "inference_dtype", "pack",
           "pick_device", "tokenize"]
