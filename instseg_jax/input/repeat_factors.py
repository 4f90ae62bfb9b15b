"""Repeat-factor sampling (LVIS, Gupta et al. 2019, appendix B.2; detectron2's
RepeatFactorTrainingSampler): images with rare categories appear more often per epoch.

For threshold t, category c found in a fraction f_c of the training images has the repeat
factor r_c = max(1, sqrt(t / f_c)); an image's factor is the largest of its categories'
(1 without any). Each epoch takes floor(r_i) copies of image i plus one more with probability
frac(r_i) (stochastic rounding: r_i copies on average), so epochs differ in length.

Categories count per image from the annotations alone (the sources' image_categories), crowd
regions left out: training drops them, so repeating an image for a crowd region of a rare
category would add no target of it (detectron2 counts every annotation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def repeat_factors(categories: Sequence, threshold: float) -> np.ndarray:
    """float64[n]: each image's repeat factor from its categories (a class index array per
    image, repeats allowed) under frequency threshold t."""
    per_image = [np.unique(np.asarray(c, np.int64)) for c in categories]
    if not per_image:
        return np.zeros(0, np.float64)
    present = np.concatenate(per_image)
    if not len(present):
        return np.ones(len(per_image), np.float64)
    images_with = np.bincount(present)
    frequency = images_with / len(per_image)
    with np.errstate(divide="ignore"):
        by_category = np.maximum(1.0, np.sqrt(threshold / frequency))
    return np.asarray([by_category[c].max() if len(c) else 1.0 for c in per_image], np.float64)


def epoch_copies(factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64[n]: copies of each image in one epoch, floor(r) plus a Bernoulli(frac(r))."""
    whole = np.floor(factors)
    return (whole + (rng.random(len(factors)) < factors - whole)).astype(np.int64)
