"""Synthetic and real tasks the benchmarks train on (each docstring shows a worked example)."""

from types import ModuleType as _ModuleType

# One block of imports per group of tasks below (separate blocks keep edits to different groups apart).
# --- Mechanisms I: associative-memory view ---
# isort: split
from attnlab.tasks.hebbian import HebbianCapacity, hebbian_capacity, predicted_cosine

# isort: split
# --- Quality benchmark tasks ---
from attnlab.tasks.digits import DigitsConfig, DigitsSplit, load_digits_split
from attnlab.tasks.incontext_regression import ICLBatch, ICLRegressionConfig, sample_linear_regression
from attnlab.tasks.match import MatchConfig, match_labels, sample_match
from attnlab.tasks.mqar import MQARConfig, multiquery_ar
from attnlab.tasks.needle import NeedleConfig, sample_needle
from attnlab.tasks.wikitext import WikiTextConfig, load_wikitext_split

__all__ = [name for name, value in dict(globals()).items()
           if not name.startswith("_") and not isinstance(value, _ModuleType)]
