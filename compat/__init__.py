"""The one place that reaches private or moving APIs of dependencies (one module per dependency)."""
