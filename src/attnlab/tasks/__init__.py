"""Synthetic and real tasks the benchmarks train on (each docstring shows a worked example)."""

# Each issue adds its imports in its own block below (keeps parallel edits apart).
# --- Mechanisms I: associative-memory view ---
# --- Quality benchmark tasks ---

__all__ = [name for name in dir() if not name.startswith("_")]
