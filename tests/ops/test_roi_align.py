import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax import ops
from tests.ops import reference as ref

METHODS = ["gather", "einsum"]


def assert_close(got, want, rtol=1e-5):
    got = np.asarray(got, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def random_case(seed, batch=2, height=13, width=17, depth=3, num_boxes=6, scale=0.5):
    """Boxes in image pixels (map * 1/scale), some partly or fully outside, some tiny."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, height, width, depth)).astype(np.float32)
    img_h, img_w = height / scale, width / scale
    xy = rng.uniform(
        [-0.3 * img_w, -0.3 * img_h], [1.1 * img_w, 1.1 * img_h], (batch, num_boxes, 2)
    )
    wh = rng.uniform(0.0, 0.8, (batch, num_boxes, 2)) * [img_w, img_h]
    wh[:, 0] = rng.uniform(0.0, 1.5, (batch, 2))  # smaller than one feature cell
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    boxes[:, 1] = [-40, -40, -20, -20]  # fully outside, above the left corner
    return features, boxes


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(("output_size", "sampling_ratio"), [(7, 2), ((3, 5), 1), (4, 3)])
def test_roi_align_matches_reference(method, seed, aligned, output_size, sampling_ratio):
    features, boxes = random_case(seed)
    got = ops.roi_align(features, boxes, output_size, 0.5, sampling_ratio, aligned, method=method)
    want = ref.roi_align(features, boxes, output_size, 0.5, sampling_ratio, aligned)
    assert got.shape == want.shape
    assert_close(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_border_rule(method):
    """Samples in [-1, 0) read cell 0, beyond size read 0; samples in (size-1, size] clamp."""
    features = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 4, 1) * np.ones((1, 4, 1, 1))
    features = features.astype(np.float32)  # value = x + 1 on every row

    # 1x1 bins, 1 sample, aligned=False: the sample sits at the box centre.
    def sample_at(x):
        box = np.array([[[x - 0.5, 1.0, x + 0.5, 2.0]]], np.float32)
        out = ops.roi_align(features, box, 1, 1.0, 1, aligned=False, method=method)
        return float(out[0, 0, 0, 0, 0])

    assert sample_at(-0.5) == 1.0  # clamped to the border cell
    assert sample_at(-1.0) == 1.0  # -1 itself is still inside
    assert sample_at(-1.25) == 0.0  # beyond -1 counts as zero
    assert sample_at(3.5) == 4.0  # between the last cell and size: clamped
    assert sample_at(4.0) == 4.0  # size itself is inside
    assert sample_at(4.25) == 0.0
    assert sample_at(1.25) == pytest.approx(2.25)


def test_half_pixel_offset_of_aligned_mode():
    """aligned=True samples a 2-px box at stride 1 around pixel centres, legacy does not."""
    features = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    box = np.array([[[1.0, 1.0, 3.0, 3.0]]], np.float32)
    aligned = ops.roi_align(features, box, 1, 1.0, 1, aligned=True)
    legacy = ops.roi_align(features, box, 1, 1.0, 1, aligned=False)
    # Centre of the box is (2, 2) in pixels: aligned reads feature coordinate 1.5, legacy 2.0.
    assert float(aligned[0, 0, 0, 0, 0]) == pytest.approx(1.5 * 4 + 1.5)
    assert float(legacy[0, 0, 0, 0, 0]) == pytest.approx(2.0 * 4 + 2.0)


@pytest.mark.parametrize("method", METHODS)
def test_single_cell_maps_and_zero_area_boxes(method):
    features = np.full((1, 1, 1, 2), 3.0, np.float32)
    boxes = np.array([[[0, 0, 0, 0], [0.2, 0.2, 0.4, 0.9], [-3, -3, -2, -2]]], np.float32)
    for aligned in (True, False):
        got = ops.roi_align(features, boxes, 2, 1.0, 2, aligned, method=method)
        assert_close(got, ref.roi_align(features, boxes, 2, 1.0, 2, aligned))


@pytest.mark.parametrize("method", METHODS)
def test_gradient_is_the_exact_adjoint(method):
    features, boxes = random_case(3, batch=2, height=9, width=11, num_boxes=4)
    cotangent = np.random.default_rng(9).normal(size=(2, 4, 5, 5, 3)).astype(np.float32)
    _, vjp = jax.vjp(lambda f: ops.roi_align(f, boxes, 5, 0.5, 2, True, method=method), features)
    (grad,) = vjp(jnp.asarray(cotangent))
    want = ref.roi_align_adjoint(cotangent, features.shape, boxes, 5, 0.5, 2, True)
    assert_close(grad, want)


def test_gradient_matches_finite_differences():
    features, boxes = random_case(4, batch=1, height=6, width=7, depth=2, num_boxes=3)
    weights = np.random.default_rng(1).normal(size=(1, 3, 2, 2, 2)).astype(np.float32)

    def loss(f):
        return jnp.sum(jnp.sin(ops.roi_align(f, boxes, 2, 0.5, 2, True)) * weights)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(features)), np.float64)
    rng = np.random.default_rng(2)
    for _ in range(5):  # central differences along random directions
        direction = rng.normal(size=features.shape).astype(np.float32)
        eps = 1e-2
        numeric = float(loss(features + eps * direction)) - float(loss(features - eps * direction))
        numeric /= 2 * eps
        assert numeric == pytest.approx(float((grad * direction).sum()), rel=2e-3, abs=2e-3)


def test_jit_and_vmap():
    features, boxes = random_case(5)
    single = lambda f, b: ops.roi_align(f[None], b[None], 3, 0.5)[0]
    batched = jax.jit(jax.vmap(single))(features, boxes)
    assert_close(batched, ref.roi_align(features, boxes, 3, 0.5))


def adaptive_case():
    """Boxes on a 13x17 map at scale 0.5 whose sides need 0 to 5 adaptive samples per bin axis.

    Sides in map cells / bins sit away from integers, so that float32 and float64 take the same
    ceil: with bins (3, 4), heights 0, 2.4, 4.5, 7.7, 13.1 cells give 0, 1, 2, 3, 5 samples and
    widths 3.3, 6.6, 10.2, 17.9, 0.7 give 1, 2, 3, 5, 1; the last boxes reach past the map.
    """
    rng = np.random.default_rng(11)
    features = rng.normal(size=(1, 13, 17, 3)).astype(np.float32)
    cells_h = np.array([0.0, 2.4, 4.5, 7.7, 13.1, 9.3])
    cells_w = np.array([3.3, 6.6, 10.2, 17.9, 0.7, 11.4])
    x0 = np.array([1.2, 0.4, 3.3, -0.6, 8.1, 9.0])
    y0 = np.array([2.6, 5.1, 0.3, 1.7, -0.4, 7.2])
    boxes = np.stack([x0, y0, x0 + cells_w, y0 + cells_h], -1) * 2.0  # image pixels
    return features, boxes[None].astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("aligned", [True, False])
def test_adaptive_sampling_matches_the_kernel_rule(method, aligned):
    """sampling_ratio 0 against tests/ops/reference.py's loop of torchvision's CPU kernel
    (roi_align_kernel.cpp, roi_align_forward_kernel_impl: grid = ceil(roi side / bins) per axis
    and box, count = max(grid_h * grid_w, 1)); 5 slots cover every box of the case."""
    features, boxes = adaptive_case()
    got = ops.roi_align(
        features, boxes, (3, 4), 0.5, 0, aligned, method=method, sampling_ratio_max=5
    )
    assert_close(got, ref.roi_align(features, boxes, (3, 4), 0.5, 0, aligned))


def test_adaptive_sampling_beyond_the_cap_takes_the_cap():
    """A side needing more than sampling_ratio_max samples per bin takes exactly that many
    spread over the bin, like a fixed sampling_ratio of the cap; sides within it keep the rule."""
    features, boxes = adaptive_case()
    within = boxes[:, :3]  # need at most 3 along either axis
    # 15 x 14 and 15 x 12.5 cells: 4 samples along x, 5 along y.
    beyond = np.float32([[[0.0, 0.0, 30.0, 28.0], [3.0, 1.0, 33.0, 26.0]]])
    got = ops.roi_align(
        features, np.concatenate([within, beyond], 1), (3, 4), 0.5, 0, sampling_ratio_max=3
    )
    assert_close(got[:, :3], ref.roi_align(features, within, (3, 4), 0.5, 0))
    assert_close(got[:, 3:], ref.roi_align(features, beyond, (3, 4), 0.5, 3))


def test_adaptive_sampling_gradient_is_the_exact_adjoint():
    features, boxes = adaptive_case()
    cotangent = np.random.default_rng(12).normal(size=(1, 6, 3, 4, 3)).astype(np.float32)
    _, vjp = jax.vjp(
        lambda f: ops.roi_align(f, boxes, (3, 4), 0.5, 0, sampling_ratio_max=5), features
    )
    (grad,) = vjp(jnp.asarray(cotangent))
    want = ref.roi_align_adjoint(cotangent, features.shape, boxes, (3, 4), 0.5, 0)
    assert_close(grad, want)


def test_rejects_bad_arguments():
    features, boxes = random_case(0)
    with pytest.raises(ValueError, match="sampling_ratio_max"):
        ops.roi_align(features, boxes, 7, 0.5, sampling_ratio=0)
    with pytest.raises(ValueError, match="sampling_ratio"):
        ops.roi_align(features, boxes, 7, 0.5, sampling_ratio=-1)
    with pytest.raises(ValueError, match="method"):
        ops.roi_align(features, boxes, 7, 0.5, method="loop")
    with pytest.raises(ValueError, match=r"boxes\[B,R,4\]"):
        ops.roi_align(features, boxes[0], 7, 0.5)


def test_fpn_level_matches_formula():
    rng = np.random.default_rng(6)
    sizes = np.concatenate(
        [[0.0, 1.0, 111.9, 112.0, 224.0, 447.9, 448.0, 2000.0], rng.uniform(1, 900, 30)]
    )
    boxes = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], 1)
    boxes = boxes.astype(np.float32)
    got = np.asarray(ops.fpn_level(boxes))
    want = [ref.fpn_level(b, 2, 5, 224, 4) for b in boxes]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ops.fpn_level(boxes[:8]), [2, 2, 2, 3, 4, 4, 5, 5])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("aligned", [True, False])
def test_multilevel_pools_each_box_from_its_level(method, aligned):
    rng = np.random.default_rng(7)
    canvas = 64
    features = [
        rng.normal(size=(2, canvas // 2**lv, canvas // 2**lv, 3)).astype(np.float32)
        for lv in range(2, 6)
    ]  # P2..P5; P5 is 2x2
    xy = rng.uniform(-8, canvas, (2, 12, 2))
    wh = np.exp(rng.uniform(np.log(0.5), np.log(80), (2, 12, 1))) * rng.uniform(
        0.5, 1.5, (2, 12, 2)
    )
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    got = ops.multilevel_roi_align(
        features, boxes, (2, 3), sampling_ratio=2, aligned=aligned, method=method, canonical_size=16
    )
    levels = [[ref.fpn_level(boxes[b, r], 2, 5, 16, 4) for r in range(12)] for b in range(2)]
    assert len({lv for row in levels for lv in row}) >= 3, "test boxes should span levels"
    for b in range(2):
        for r in range(12):
            lv = levels[b][r]
            want = ref.roi_align(
                features[lv - 2][b : b + 1],
                boxes[b : b + 1, r : r + 1],
                (2, 3),
                2.0**-lv,
                2,
                aligned,
            )
            assert_close(got[b, r], want[0, 0])


def test_multilevel_adaptive_sampling_measures_boxes_on_their_level():
    """The adaptive count comes from each box's side in cells of its own level (detectron2's
    ROIPooler runs one ROIAlign per level at that level's spatial_scale)."""
    rng = np.random.default_rng(13)
    features = [
        rng.normal(size=(1, 64 // 2**lv, 64 // 2**lv, 2)).astype(np.float32) for lv in (2, 3, 4)
    ]
    # Level 2: 10.4 x 18.6 px = 2.6 x 4.65 cells; level 3: 37 x 21 px; level 4: 59 x 52 px.
    boxes = np.float32([[[3, 5, 13.4, 23.6], [1, 2, 38, 23], [2, 4, 61, 56]]])
    levels = [2, 3, 4]
    got = ops.multilevel_roi_align(
        features, boxes, 2, sampling_ratio=0, levels=np.int32([levels]), sampling_ratio_max=4
    )
    for r, lv in enumerate(levels):
        want = ref.roi_align(features[lv - 2], boxes[:, r : r + 1], 2, 2.0**-lv, 0, True)
        assert_close(got[0, r], want[0, 0])


def test_multilevel_accepts_explicit_levels():
    rng = np.random.default_rng(8)
    features = [
        rng.normal(size=(1, 16 // 2**i, 16 // 2**i, 2)).astype(np.float32) for i in range(3)
    ]
    boxes = np.array([[[0, 0, 8, 8], [2, 2, 30, 30]]], np.float32)
    levels = np.array([[4, 2]], np.int32)
    got = ops.multilevel_roi_align(features, boxes, 2, levels=levels)
    for r, lv in enumerate([4, 2]):
        want = ref.roi_align(features[lv - 2], boxes[:, r : r + 1], 2, 2.0**-lv, 2, True)
        assert_close(got[0, r], want[0, 0])


def test_multilevel_gradient_is_the_exact_adjoint():
    rng = np.random.default_rng(10)
    features = [
        rng.normal(size=(1, 16 // 2**i, 16 // 2**i, 2)).astype(np.float32) for i in range(3)
    ]
    boxes = np.array([[[0, 0, 3, 3], [1, 1, 9, 10], [0, 0, 15, 16], [4, 2, 6, 5]]], np.float32)
    cot = rng.normal(size=(1, 4, 2, 2, 2)).astype(np.float32)
    _, vjp = jax.vjp(lambda f: ops.multilevel_roi_align(f, boxes, 2, canonical_size=8), features)
    (grads,) = vjp(jnp.asarray(cot))
    levels = [ref.fpn_level(b, 2, 4, 8, 4) for b in boxes[0]]
    for i, grad in enumerate(grads):
        on_level = [r for r in range(4) if levels[r] == i + 2]
        want = ref.roi_align_adjoint(
            cot[:, on_level], features[i].shape, boxes[:, on_level], 2, 2.0 ** -(i + 2), 2, True
        )
        assert_close(grad, want)


def test_gradient_with_respect_to_boxes_matches_finite_differences():
    """Bilinear weights move with the box: the box gradient is defined and correct."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:12, :12].astype(np.float32)
    smooth = np.stack([np.sin(yy / 3) + np.cos(xx / 4), yy * xx / 50], -1)[None]  # [1,12,12,2]
    boxes = np.array([[[2.3, 1.7, 8.1, 9.4], [0.6, 3.2, 5.5, 6.1]]], np.float32)
    weights = rng.normal(size=(1, 2, 3, 3, 2)).astype(np.float32)

    def loss(b):
        return jnp.sum(ops.roi_align(jnp.asarray(smooth), b, 3, 1.0, 2, True) * weights)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(boxes)))
    eps = 1e-2
    for r in range(2):
        for c in range(4):
            step = np.zeros_like(boxes)
            step[0, r, c] = eps
            numeric = (float(loss(boxes + step)) - float(loss(boxes - step))) / (2 * eps)
            assert grad[0, r, c] == pytest.approx(numeric, rel=3e-2, abs=3e-3)
