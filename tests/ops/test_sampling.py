"""Bilinear point sampling, importance-sampled points and multi-scale deformable attention
against float64 NumPy loops written from grid_sample's definition (align_corners=False, zero
padding: pixel i's centre at (i + 0.5) / size)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instseg_jax.ops.sampling import (
    deformable_attention,
    point_features,
    point_sample,
    uncertain_cells,
    uncertain_points,
    upsample2x,
)


def grid_sample_point(image, x, y):
    """float64 bilinear value of image[H, W, ...] at (x, y) in [0, 1], zeros outside."""
    height, width = image.shape[:2]
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    total = np.zeros(image.shape[2:])
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            if 0 <= xi < width and 0 <= yi < height:
                total = total + (1 - abs(px - xi)) * (1 - abs(py - yi)) * image[yi, xi]
    return total


def test_point_sample_matches_grid_sample_definition():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 7, 5)).astype(np.float32)
    points = rng.uniform(-0.1, 1.1, (3, 40, 2)).astype(np.float32)  # some fall off the map
    points[0, :4] = [[0, 0], [1, 1], [0.5 / 5, 0.5 / 7], [1, 0]]
    got = np.asarray(jax.jit(point_sample)(maps, points))
    for n in range(3):
        for p in range(40):
            want = grid_sample_point(maps[n].astype(np.float64), *points[n, p])
            assert got[n, p] == pytest.approx(want, abs=1e-5)
    # A pixel centre reads that pixel; bool masks sample as 0/1.
    assert got[0, 2] == pytest.approx(maps[0, 0, 0], abs=1e-6)
    masks = maps > 0
    assert np.allclose(
        point_sample(masks, points), point_sample(masks.astype(np.float32), points), atol=1e-6
    )


def test_uncertain_points_are_the_least_sure_of_the_drawn_ones():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 9, 11)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    points = np.asarray(uncertain_points(key, jnp.asarray(logits), 20, 3.0, 0.75))
    assert points.shape == (2, 20, 2) and (points >= 0).all() and (points <= 1).all()
    draw_key, _ = jax.random.split(key)
    drawn = np.asarray(jax.random.uniform(draw_key, (2, 60, 2)))
    for n in range(2):
        uncertainty = np.array(
            [-abs(grid_sample_point(logits[n].astype(np.float64), *p)) for p in drawn[n]]
        )
        want = drawn[n][np.argsort(-uncertainty, kind="stable")[:15]]
        assert np.allclose(np.sort(points[n, :15], 0), np.sort(want, 0), atol=1e-6)
        # The rest are fresh uniform points, not copies of the drawn ones.
        assert not np.isin(points[n, 15:, 0], drawn[n, :, 0]).any()
    # The same draws given (the loss parity's path) give the same points.
    given = (jnp.asarray(drawn), jnp.asarray(points[:, 15:]))
    again = uncertain_points(None, jnp.asarray(logits), 20, 3.0, 0.75, given)
    np.testing.assert_array_equal(np.asarray(again), points)


def test_point_features_match_grid_sample_and_their_gradient_is_the_adjoint():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(2, 6, 9, 5)).astype(np.float32)
    points = rng.uniform(-0.1, 1.1, (2, 3, 7, 2)).astype(np.float32)
    got = np.asarray(jax.jit(point_features)(features, points))
    assert got.shape == (2, 3, 7, 5)
    for b in range(2):
        for n in range(3):
            for p in range(7):
                want = grid_sample_point(features[b].astype(np.float64), *points[b, n, p])
                assert np.allclose(got[b, n, p], want, atol=1e-5)
    # The feature gradient of <cotangent, sample> scatters each cotangent to the four taps
    # with their bilinear weights: checked through the linear map's adjoint identity.
    cotangent = rng.normal(size=got.shape).astype(np.float32)
    grad = np.asarray(
        jax.grad(lambda f: jnp.sum(point_features(f, points) * cotangent))(jnp.asarray(features))
    )
    probe = rng.normal(size=features.shape).astype(np.float32)
    lhs = float(np.sum(np.asarray(point_features(probe, points)) * cotangent))
    assert float(np.sum(grad * probe)) == pytest.approx(lhs, rel=1e-4)


def test_upsample2x_matches_half_pixel_bilinear_with_edge_clamping():
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(2, 4, 6)).astype(np.float32)
    got = np.asarray(upsample2x(maps))
    assert got.shape == (2, 8, 12)

    def source(i, size):  # torch's align_corners=False source coordinate, clamped at 0
        s = max((i + 0.5) / 2 - 0.5, 0.0)
        lo = min(int(np.floor(s)), size - 1)
        hi = min(lo + 1, size - 1)
        return lo, hi, s - lo

    for n in range(2):
        for y in range(8):
            y0, y1, fy = source(y, 4)
            for x in range(12):
                x0, x1, fx = source(x, 6)
                m = maps[n].astype(np.float64)
                want = (1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1]) + fy * (
                    (1 - fx) * m[y1, x0] + fx * m[y1, x1]
                )
                assert got[n, y, x] == pytest.approx(want, abs=1e-5)


def test_uncertain_cells_are_the_top_k_cells_and_their_centres():
    rng = np.random.default_rng(6)
    uncertainty = rng.normal(size=(3, 5, 7)).astype(np.float32)
    index, centres = (np.asarray(a) for a in uncertain_cells(jnp.asarray(uncertainty), 9))
    assert index.shape == (3, 9) and centres.shape == (3, 9, 2)
    for n in range(3):
        flat = uncertainty[n].ravel()
        assert set(index[n]) == set(np.argsort(-flat)[:9])
        rows, cols = np.divmod(index[n], 7)
        assert np.allclose(centres[n], np.stack([(cols + 0.5) / 7, (rows + 0.5) / 5], -1))
    # More points than cells: every cell once.
    index, _ = uncertain_cells(jnp.asarray(uncertainty), 100)
    assert sorted(np.asarray(index)[0]) == list(range(35))


LEVELS = ((6, 5), (3, 3), (2, 1))


def deformable_inputs(seed):
    rng = np.random.default_rng(seed)
    cells = sum(h * w for h, w in LEVELS)
    value = rng.normal(size=(2, cells, 3, 4)).astype(np.float32)
    locations = rng.uniform(-0.2, 1.2, (2, 5, 3, len(LEVELS), 2, 2)).astype(np.float32)
    attention = rng.uniform(size=(2, 5, 3, len(LEVELS), 2)).astype(np.float32)
    return value, locations, attention


def test_deformable_attention_matches_a_loop():
    value, locations, attention = deformable_inputs(2)
    got = np.asarray(
        jax.jit(deformable_attention, static_argnums=1)(value, LEVELS, locations, attention)
    )
    starts = np.cumsum([0] + [h * w for h, w in LEVELS])
    batch, queries, heads, _, points, _ = locations.shape
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                want = np.zeros(value.shape[-1])
                for level, (h, w) in enumerate(LEVELS):
                    image = value[b, starts[level] : starts[level] + h * w, m].reshape(h, w, -1)
                    for k in range(points):
                        want += attention[b, q, m, level, k] * grid_sample_point(
                            image.astype(np.float64), *locations[b, q, m, level, k]
                        )
                np.testing.assert_allclose(got[b, q, m], want, atol=1e-5)


def test_deformable_attention_gradients_match_autodiff_of_plain_gathers():
    """The custom backward (scatter-add, weight cotangents) against jax.grad of a direct
    per-level take_along_axis form."""
    value, locations, attention = deformable_inputs(3)
    cotangent = np.random.default_rng(4).normal(size=(2, 5, 3, 4)).astype(np.float32)

    def plain(value, locations, attention):
        starts = np.cumsum([0] + [h * w for h, w in LEVELS])
        total = 0.0
        for level, (h, w) in enumerate(LEVELS):
            level_value = value[:, starts[level] : starts[level] + h * w]  # [B, HW, M, D]
            level_value = level_value.transpose(0, 2, 1, 3)  # [B, M, HW, D]
            maps = level_value.reshape(-1, h, w, value.shape[-1])
            pts = locations[:, :, :, level].transpose(0, 2, 1, 3, 4)  # [B, M, Q, K, 2]
            pts = pts.reshape(maps.shape[0], -1, 2)
            sampled = jax.vmap(
                lambda m, p: jax.vmap(lambda c: point_sample(c[None], p[None])[0], 2, 1)(m)
            )(maps, pts)  # [B*M, Q*K, D]
            sampled = sampled.reshape(
                value.shape[0], value.shape[2], locations.shape[1], -1, value.shape[-1]
            )
            weights = attention[:, :, :, level].transpose(0, 2, 1, 3)[..., None]
            total = total + (sampled * weights).sum(3).transpose(0, 2, 1, 3)
        return total

    def loss(fn):
        return lambda v, loc, a: jnp.sum(fn(v, loc, a) * cotangent)

    ours = jax.grad(loss(lambda v, loc, a: deformable_attention(v, LEVELS, loc, a)), (0, 1, 2))
    want = jax.grad(loss(plain), (0, 1, 2))
    np.testing.assert_allclose(
        plain(value, locations, attention),
        deformable_attention(value, LEVELS, locations, attention),
        atol=1e-5,
    )
    grads = zip(ours(value, locations, attention), want(value, locations, attention), strict=True)
    for got, ref in grads:
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


# Run in a process of 8 host devices (the test process has one): the ops' gradients under a
# batch split over them, and every collective of the compiled program, as JSON.
SHARDED_GATHERS = """import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from instseg_jax import hlo_collectives
from instseg_jax.ops.sampling import deformable_attention, point_features, point_sample
by_image = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec("data"))
levels = [(8, 8), (4, 4)]
cells = 80

def loss(maps, points, features, value, locations, attention, crops):
    sampled = jax.vmap(point_sample)(maps, points)
    # every image's crops in one map axis, labels without gradient (PointRend's point labels)
    merged = crops.reshape(-1, 16, 16).astype(jnp.float32)
    labels = point_sample(merged, points.reshape(-1, 10, 2))
    labels = jax.lax.stop_gradient(labels).reshape(sampled.shape)
    pooled = point_features(features, points)
    attended = deformable_attention(value, levels, locations, attention)
    return (sampled * labels).sum() + (pooled ** 2).sum() + (attended ** 2).sum()

shapes = [(3, 16, 16), (3, 10, 2), (16, 16, 4)]
shapes += [(cells, 2, 4), (cells, 2, 2, 3, 2), (cells, 2, 2, 3)]
args = [jax.ShapeDtypeStruct((8,) + s, jnp.float32, sharding=by_image) for s in shapes]
args.append(jax.ShapeDtypeStruct((8, 3, 16, 16), jnp.uint8, sharding=by_image))
grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))), out_shardings=by_image)
text = grads.lower(*args).compile().as_text()
print(json.dumps(hlo_collectives.collectives(text)))
"""


def test_gathers_of_a_sharded_batch_stay_on_their_chips():
    """Point sampling (per image, and of every image's maps in one axis as PointRend's point
    labels), feature sampling and deformable attention of a batch split over 8 devices compile,
    gradients included, without a cross-chip collective beyond a scalar's sum. The first
    corner-first point_sample gathered from all maps flattened into one row, which the
    partitioner all-gathered here (and in PointRend's and Mask2Former's steps)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_GATHERS], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    crossing = [c for c in found if c["kind"] != "all-reduce" or c["bytes"] > 64]
    assert not crossing, [(c["kind"], c["bytes"], c["op_name"]) for c in crossing][:5]
