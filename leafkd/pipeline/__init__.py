"""The main job in one call: a corpus in; a student distilled for it, its index, a report and a served pair out."""

from leafkd.pipeline.config import RECIPE, DistillConfig, load_distill_config
from leafkd.pipeline.distill import DistillResult, distill

__all__ = ["RECIPE", "DistillConfig", "DistillResult", "distill", "load_distill_config"]
