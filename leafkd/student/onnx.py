"""ONNX export of a student's whole query pipeline (extra ``onnx``).

One graph ``input_ids, attention_mask -> sentence_embedding``: the transformer (or the static table), mean pooling,
the Dense projection and L2 normalisation, exported with ``torch.onnx.export(dynamo=False, opset_version=17)``
(no onnxscript, no optimum at run time). ``int8`` adds ``model_int8.onnx``: onnxruntime's dynamic quantisation with
per-channel QUInt8 symmetric weights (Optimum's avx2 settings; per-tensor or QInt8 weights lose far more, see
docs/students.md). The folder also holds the tokenizer the graph expects (truncating, never padding) and
``onnx.json``: the dimension, the lower-casing, the opset and the measured cosine of each graph against torch.

sentence-transformers' own ONNX backend needs optimum-onnx, which does not install next to sentence-transformers 6
(it pins transformers < 4.58), and it keeps pooling and Dense in torch; this graph needs only onnxruntime.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from leafkd import atomic
from leafkd.errors import LeafkdError
from leafkd.extras import require
from leafkd.models import resolve_model
from leafkd.student.static import is_static, load_student

logger = logging.getLogger(__name__)

FOLDER = "leafkd-onnx"  # default export folder, inside the student's folder (sentence-transformers ignores it)
META = "onnx.json"
FP32, INT8 = "model.onnx", "model_int8.onnx"
OPSET = 17
MIN_FP32_COSINE = 0.999  # an fp32 graph further from torch than this is refused
MIN_INT8_COSINE = 0.98  # an int8 graph further than this is written with a warning (12-layer mpnet: 0.79)
# Texts the exported graphs are checked on against torch (short queries and longer passages, mixed case).
CHECK_TEXTS = (
    "who wrote the novel invisible man and when was it published",
    "what is the boiling point of water at high altitude",
    "Distillation trains a small student to reproduce a large teacher's embeddings.",
    "FAISS indexes billions of vectors; queries are embedded at request time by a much smaller model.",
    "how do i reset my password",
    "The aerodynamic heating of a slender cone at hypersonic speeds was measured in a shock tunnel, and the "
    "results were compared with laminar boundary-layer theory for several Reynolds numbers and wall temperatures.",
    "mitochondria",
    "Quels sont les effets secondaires de ce médicament ?",
)


class SentenceGraph(torch.nn.Module):
    """The student as one function of token ids and mask: its modules, mean pooling, then L2 normalisation."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.static = is_static(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.static:  # plain gather + masked mean (embedding_bag with weights exports poorly)
            mask = attention_mask.unsqueeze(-1).to(torch.float32)
            tokens = F.embedding(input_ids, self.model[0].embedding.weight)
            features = {"sentence_embedding": (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)}
            for module in list(self.model)[1:]:
                features = module(features)
        else:
            features = self.model({"input_ids": input_ids, "attention_mask": attention_mask})
        return F.normalize(features["sentence_embedding"].float(), dim=-1)


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and how close each graph is to torch (cosine over `CHECK_TEXTS`)."""

    folder: Path
    dim: int
    max_length: int
    lower: bool
    opset: int = OPSET
    files: dict[str, str] = field(default_factory=dict)  # "fp32" / "int8" -> file name
    cosine_min: dict[str, float] = field(default_factory=dict)
    cosine_mean: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "folder"}


def query_tokenizer(model, max_length: int):
    """A copy of the student's Rust tokenizer that truncates at `max_length` and never pads."""
    from tokenizers import Tokenizer

    backend = getattr(model.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LeafkdError("ONNX export needs a fast (Rust) tokenizer")
    tok = Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session: all graph optimisations, `threads` intra-op threads (1 suits single queries on
    a small machine: spinning thread pools slow each other down), sequential execution."""
    require(["onnxruntime"], "onnx", "ONNX inference")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_graph(sess, tokenizer, texts: Sequence[str], lower: bool = False) -> np.ndarray:
    """Vectors of `texts` from an ONNX session, one text per call (the query path)."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text.lower() if lower else text).ids or [0]
        arr = np.asarray([ids], dtype=np.int64)
        out.append(sess.run(None, {"input_ids": arr, "attention_mask": np.ones_like(arr)})[0][0])
    return np.stack(out).astype(np.float32)


def _export_graph(graph: SentenceGraph, path: Path) -> None:
    # The tracer warns about every Python-level branch of the model; those branches are shape checks that hold for
    # any batch (the check against torch below is what tells whether the graph is right).
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message="Exporting aten::index", category=UserWarning)
    ids = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0]])  # a padded batch: the mask input is traced live
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    torch.onnx.export(graph, (ids, mask), str(path), dynamo=False, opset_version=OPSET,
                      input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                                    "sentence_embedding": {0: "batch"}})


def quantize_int8(fp32: Path, int8: Path) -> None:
    """Dynamic int8 quantisation: per-channel QUInt8 symmetric weights (Optimum's avx2 configuration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    advice = _DropAdvice()
    root.addFilter(advice)  # its advice to pre-process does not apply to dynamic quantisation of these graphs
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QUInt8, per_channel=True,
                         extra_options={"WeightSymmetric": True})
    finally:
        root.removeFilter(advice)


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _target(student: Path, out: str | Path | None) -> Path:
    folder = Path(out) if out is not None else student / FOLDER
    if folder.is_dir() and any(folder.iterdir()) and not (folder / META).is_file():
        raise LeafkdError(f"{folder} exists and is not a leafkd ONNX export: give an empty or new folder")
    return folder


def export_onnx(student: str | Path, out: str | Path | None = None, *, int8: bool = False,
                check_texts: Sequence[str] = CHECK_TEXTS) -> OnnxExport:
    """Export `student` (a SentenceTransformer folder) to ``out`` (default: STUDENT/leafkd-onnx/), optionally with
    an int8 graph, and measure each graph's cosine to torch on `check_texts`. Replaces an earlier export there."""
    require(["onnx", "onnxruntime"], "onnx", "ONNX export")
    path = resolve_model(student)
    folder = _target(path, out)
    model = load_student(path, device="cpu").eval()
    max_length = int(getattr(model, "max_seq_length", None) or 512)
    lower = bool(getattr(model[0], "do_lower_case", False))
    graph = SentenceGraph(model).eval()
    tokenizer = query_tokenizer(model, max_length)
    # The reference is sentence-transformers' own encode: it checks the saved tokenizer as well as the graph.
    reference = model.encode(list(check_texts), normalize_embeddings=True, convert_to_numpy=True)
    result = OnnxExport(folder=folder, dim=int(reference.shape[1]), max_length=max_length, lower=lower)
    with atomic.atomic_dir(folder) as tmp:
        _export_graph(graph, tmp / FP32)
        result.files["fp32"] = FP32
        if int8:
            quantize_int8(tmp / FP32, tmp / INT8)
            result.files["int8"] = INT8
        for kind, name in result.files.items():
            cos = np.sum(run_graph(session(tmp / name), tokenizer, check_texts, lower) * reference, axis=1)
            result.cosine_min[kind], result.cosine_mean[kind] = float(cos.min()), float(cos.mean())
        if result.cosine_min["fp32"] < MIN_FP32_COSINE:  # nothing is written: the graph is not the model
            raise LeafkdError(f"the ONNX graph of {path} does not reproduce it (cosine to torch "
                              f"{result.cosine_min['fp32']:.4f} < {MIN_FP32_COSINE})")
        if result.cosine_min.get("int8", 1.0) < MIN_INT8_COSINE:
            logger.warning("the int8 graph of %s is far from torch (cosine min %.4f): serve the fp32 graph or "
                           "check retrieval quality first", path, result.cosine_min["int8"])
        tokenizer.save(str(tmp / "tokenizer.json"))
        atomic.write_text(tmp / META, json.dumps(result.to_json(), indent=2))
    logger.info("ONNX export of %s to %s: cosine to torch %s", path, folder, result.cosine_min)
    return result


def read_export(folder: str | Path) -> dict:
    """The ``onnx.json`` of an export folder (a `LeafkdError` when there is none)."""
    meta = Path(folder) / META
    if not meta.is_file():
        raise LeafkdError(f"{folder}: no ONNX export here (run `leafkd export --student STUDENT --onnx`)")
    return json.loads(meta.read_text())
