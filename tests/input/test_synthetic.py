import numpy as np

from instseg_jax.input.synthetic import SyntheticSource


def test_same_seed_same_bytes_and_exact_masks():
    a = SyntheticSource(8, (96, 80), seed=3)
    b = SyntheticSource(8, (96, 80), seed=3)
    c = SyntheticSource(8, (96, 80), seed=4)
    differs = False
    for i in range(8):
        x, y, z = a.load(i), b.load(i), c.load(i)
        for key in ("image", "masks", "boxes", "classes"):
            assert x[key].tobytes() == y[key].tobytes()
        differs |= x["image"].tobytes() != z["image"].tobytes()
        masks = x["masks"]
        assert x["image"].shape == (96, 80, 3) and masks.shape[1:] == (96, 80)
        assert (masks.sum(axis=0) <= 1).all(), "instances do not overlap (occlusion is exact)"
        for mask, box in zip(masks, x["boxes"], strict=True):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        assert set(x["classes"].tolist()) <= {0, 1, 2}
    assert differs
