"""Evaluation: local MTEB-style tasks, embedders for each mode, two engines, diagnostics, the runner, reports."""

from leafkd.evaluation.diagnostics import (
                                           alignment_diagnostics,
                                           cosine_summary,
                                           dequantize_int8,
                                           hamming_similarity,
                                           int8_calibration,
                                           quantize_binary,
                                           quantize_int8,
                                           quantized_scores,
                                           truncate,
)
from leafkd.evaluation.embedders import (
                                           MODES,
                                           AsymmetricEmbedder,
                                           Embedder,
                                           EmbeddingCache,
                                           LinearMapEmbedder,
                                           ModelEmbedder,
                                           ModelSet,
                                           RidgeMap,
                                           fit_ridge_map,
                                           load_models,
                                           ridge_texts,
)
from leafkd.evaluation.engines import evaluate, fast_evaluate_task, mteb_evaluate, resolve_engine
from leafkd.evaluation.metrics import ndcg_at_k, recall_at_k, retrieval_metrics, search, sts_metrics
from leafkd.evaluation.report import markdown_table, write_report
from leafkd.evaluation.runner import run_evaluation
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

__all__ = ["DEFAULT_TASKS", "KNOWN_TASKS", "MODES", "PUBLISHED", "AsymmetricEmbedder", "Embedder", "EmbeddingCache",
           "LinearMapEmbedder", "ModelEmbedder", "ModelSet", "RetrievalData", "RidgeMap", "STSData", "TaskSpec",
           "alignment_diagnostics", "cosine_summary", "dequantize_int8", "evaluate", "fast_evaluate_task",
           "fit_ridge_map", "hamming_similarity", "int8_calibration", "load_models", "load_task", "load_tasks",
           "markdown_table", "mteb_evaluate", "ndcg_at_k", "quantize_binary", "quantize_int8", "quantized_scores",
           "recall_at_k", "resolve_engine", "resolve_tasks", "retrieval_metrics", "ridge_texts", "run_evaluation",
           "search", "sts_metrics", "truncate", "write_report"]
