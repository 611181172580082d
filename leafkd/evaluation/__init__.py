"""Evaluation: local MTEB-style tasks, embedders for each mode, two engines, diagnostics, the runner, reports.

No extra is needed on import: scipy (STS metrics) comes with sentence-transformers; mteb (the reference engine)
and pytrec_eval (trec metrics) come with ``leafkd[eval]`` and are optional: without them the built-in ``fast``
engine and nDCG implementation give the same numbers, and asking for ``--engine mteb`` names the extra.

Its names load on first use (PEP 562): the CLI's parser reads `Mode`, `Engine` and the task list without
loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leafkd.lazy import lazy_names

_MODULES = {  # defining module -> its public names
    "leafkd.evaluation.diagnostics": ["Quantization", "alignment_diagnostics", "cosine_summary", "dequantize_int8",
                                      "hamming_similarity", "int8_ranges", "quantized_scores", "retrieval_agreement",
                                      "truncate"],
    "leafkd.evaluation.embedders": ["AsymmetricEmbedder", "Embedder", "EmbeddingCache", "LinearMapEmbedder", "Mode",
                                    "ModelEmbedder", "ModelSet", "RidgeMap", "fit_ridge_map", "load_models",
                                    "parse_modes", "ridge_texts"],
    "leafkd.evaluation.engines": ["Engine", "evaluate", "fast_evaluate_task", "mteb_evaluate", "resolve_engine"],
    "leafkd.evaluation.metrics": ["ndcg_at_k", "recall_at_k", "retrieval_metrics", "search", "sts_metrics"],
    "leafkd.evaluation.report": ["markdown_table", "write_report"],
    "leafkd.evaluation.runner": ["evaluate_models", "run_evaluation"],
    "leafkd.evaluation.tasks": ["DEFAULT_TASKS", "KNOWN_TASKS", "PUBLISHED", "RetrievalData", "STSData", "TaskSpec",
                                "load_task", "load_tasks", "resolve_tasks"],
}
_NAMES = {name: module for module, names in _MODULES.items() for name in names}

if TYPE_CHECKING:
    from leafkd.evaluation.diagnostics import (
                                               Quantization,
                                               alignment_diagnostics,
                                               cosine_summary,
                                               dequantize_int8,
                                               hamming_similarity,
                                               int8_ranges,
                                               quantized_scores,
                                               retrieval_agreement,
                                               truncate,
    )
    from leafkd.evaluation.embedders import (
                                               AsymmetricEmbedder,
                                               Embedder,
                                               EmbeddingCache,
                                               LinearMapEmbedder,
                                               Mode,
                                               ModelEmbedder,
                                               ModelSet,
                                               RidgeMap,
                                               fit_ridge_map,
                                               load_models,
                                               parse_modes,
                                               ridge_texts,
    )
    from leafkd.evaluation.engines import Engine, evaluate, fast_evaluate_task, mteb_evaluate, resolve_engine
    from leafkd.evaluation.metrics import ndcg_at_k, recall_at_k, retrieval_metrics, search, sts_metrics
    from leafkd.evaluation.report import markdown_table, write_report
    from leafkd.evaluation.runner import evaluate_models, run_evaluation
    from leafkd.evaluation.tasks import (
                                               DEFAULT_TASKS,
                                               KNOWN_TASKS,
                                               PUBLISHED,
                                               RetrievalData,
                                               STSData,
                                               TaskSpec,
                                               load_task,
                                               load_tasks,
                                               resolve_tasks,
    )

__getattr__ = lazy_names(__name__, globals(), _NAMES)

__all__ = ["DEFAULT_TASKS", "KNOWN_TASKS", "PUBLISHED", "AsymmetricEmbedder", "Embedder", "EmbeddingCache", "Engine",
           "LinearMapEmbedder", "Mode", "ModelEmbedder", "ModelSet", "Quantization", "RetrievalData", "RidgeMap",
           "STSData", "TaskSpec", "alignment_diagnostics", "cosine_summary", "dequantize_int8", "evaluate",
           "fast_evaluate_task", "fit_ridge_map", "hamming_similarity", "int8_ranges", "load_models", "load_task",
           "load_tasks", "markdown_table", "mteb_evaluate", "ndcg_at_k", "parse_modes", "quantized_scores",
           "recall_at_k", "resolve_engine", "resolve_tasks", "retrieval_agreement", "retrieval_metrics",
           "ridge_texts", "evaluate_models", "run_evaluation", "search", "sts_metrics", "truncate", "write_report"]
