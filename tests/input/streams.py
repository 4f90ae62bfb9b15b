"""Reading an input pipeline in tests: the next batches, and batch-by-batch equality."""

import numpy as np


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
