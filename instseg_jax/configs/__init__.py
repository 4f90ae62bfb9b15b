"""Shared experiment recipes (common.py). This package sits above `methods/` in the layers: a
recipe may ask a method for its `smoke` shrink, which the ground-floor config.py may not."""
