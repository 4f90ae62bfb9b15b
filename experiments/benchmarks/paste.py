"""Detections -> RLE at the original size, before and after the host-side paste.

    python experiments/benchmarks/paste.py [--images 200] [--sizes 40] [--no-append]

1. COCO-like evaluation load: 200 images of 40 different sizes (COCO-like shapes, 333-640 px
   a side), each with 1-100 detections of 28x28 box-relative masks. Both paths turn them into
   COCO results (masks pasted at the original size, RLE-encoded):
     before  the previous evaluate.paste: `ops.paste_masks` jitted per (K, H, W), K x H x W
             float32 in XLA, all K masks encoded at once
     after   instseg_jax.detections (NumPy, per box region, one H x W buffer per image)
   Reported: total seconds, XLA compilations (jax.monitoring), the largest mask array held.
2. One 4000x3000 photo with 100 detections (predict's worst case): seconds and peak memory.
3. Canvas masks (stride 4 on a 1344 canvas) of the same 200 images: seconds, compilations.
4. End to end: `evaluate_model` of the smoke Mask R-CNN (random weights, score threshold 0, so
   up to 100 detections an image) on a synthetic COCO split of 200 images written to disk; the
   time split into input, device (compilation of the first batch included), paste+RLE, ground
   truth loading and COCOeval.

Both paths must agree on the box-relative case (checked: IoU >= 0.99 wherever the RLEs differ).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import jax
import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, machine_line, markdown_table

from instseg_jax import detections, ops, structures


class CompileCounter:
    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def workload(num_images: int, num_sizes: int, seed: int = 0):
    """[(image_hw, boxes [K, 4], masks [K, 28, 28])] with K in 1..100."""
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(333, 641)), int(rng.integers(333, 641))) for _ in range(num_sizes)]
    items = []
    for i in range(num_images):
        h, w = sizes[i % num_sizes]
        k = int(rng.integers(1, 101))
        corner = rng.uniform(0, 1, (k, 2)) * [w, h]
        size = rng.uniform(0.02, 0.5, (k, 2)) * [w, h]
        boxes = np.concatenate([corner, np.minimum(corner + size, [w, h])], 1).astype(np.float32)
        masks = rng.uniform(size=(k, 28, 28)).astype(np.float32)
        items.append(((h, w), boxes, masks))
    return items


@jax.jit
def _paste_per_shape(masks, boxes, hw_dummy):  # the previous code path, verbatim in effect
    return ops.paste_masks(masks, boxes, hw_dummy.shape)


def before(items):
    """The previous evaluate.paste_and_encode: one program per (K, H, W)."""
    out, largest = [], 0
    for hw, boxes, masks in items:
        pasted = np.asarray(_paste_per_shape(masks, boxes, np.zeros(hw, np.bool_)))
        largest = max(largest, pasted.shape[0] * hw[0] * hw[1] * 4)  # float32 K x H x W inside
        rles = mask_utils.encode(np.asfortranarray(pasted.transpose(1, 2, 0).astype(np.uint8)))
        out.append([r["counts"] for r in rles])
    return out, largest


def after(items):
    out, largest = [], 0
    for hw, boxes, masks in items:
        buffer = np.zeros(hw, np.uint8, order="F")
        counts = []
        for k in range(len(boxes)):
            region, top, left = detections.paste_box_mask(masks[k], boxes[k], hw)
            largest = max(largest, region.size * 4 + buffer.size)
            counts.append(detections.encode_region(region, top, left, buffer)["counts"].encode())
        out.append(counts)
    return out, largest


def canvas_after(items, canvas=1344, stride=4):
    rng = np.random.default_rng(1)
    for hw, boxes, _ in items:
        scale = min(800 / min(hw), 1333 / max(hw))
        geometry = structures.ImageGeometry(
            orig_hw=hw,
            image_hw=(round(hw[0] * scale), round(hw[1] * scale)),
            canvas_hw=(canvas, canvas),
            scale=scale,
            crop_offset=(0, 0),
        )
        side = canvas // stride
        masks = np.zeros((len(boxes), side, side), np.float32)
        for k, (x0, y0, x1, y1) in enumerate(np.round(boxes * scale / stride).astype(int)):
            masks[k, y0 : y1 + 1, x0 : x1 + 1] = rng.uniform(0.3, 1.0)
        resampler = detections.CanvasResampler(geometry, (side, side))
        buffer = np.zeros(hw, np.uint8, order="F")
        for mask in masks:
            detections.encode_region(*resampler.region(mask), buffer)


def end_to_end(num_images: int) -> dict:
    import tempfile

    from instseg_jax import builders, evaluate
    from instseg_jax import config as config_lib
    from instseg_jax.input.pipeline import padding_example
    from instseg_jax.input.synthetic import SyntheticSource, write_coco

    with tempfile.TemporaryDirectory() as folder:
        annotations, images = write_coco(SyntheticSource(num_images, (112, 128), seed=7), folder)
        config = config_lib.load(
            "experiments/maskrcnn_nuclei.py:smoke",
            [
                "--config.input.eval_source=coco",
                f"--config.input.eval_split.annotations={annotations}",
                f"--config.input.eval_split.images={images}",
                "--config.model.score_threshold=0.0",
                "--config.eval.global_batch=4",
            ],
        )
        source = builders.build_source(config.input, train=False)
        _, _, model = builders.build_model(config, source.num_classes)
        example = builders.device_fields(padding_example(builders.transform_config(config, False)))
        batch = {k: np.stack([v] * 2) for k, v in example.items()}
        variables = model.init(jax.random.key(0), batch, train=True, key=jax.random.key(1))
        report = evaluate.evaluate_model(
            config,
            variables,
            None,
            print_tables=False,
            class_map=builders.class_map(config, source),
        )
        return report["timing"]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sizes", type=int, default=40)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    counter = CompileCounter()
    items = workload(args.images, args.sizes)
    num_dets = sum(len(b) for _, b, _ in items)

    rows = []
    compiles = counter.count
    (old, old_largest), old_s = timed(before, items)
    old_compiles = counter.count - compiles
    compiles = counter.count
    (new, new_largest), new_s = timed(after, items)
    new_compiles = counter.count - compiles
    # Agreement: XLA's einsum and NumPy's sums round differently, so a pixel whose value is
    # within float32 noise of 0.5 may fall on either side; the IoU of the two masks says how much.
    mismatched, worst_iou = 0, 1.0
    for (hw, _, _), old_counts, new_counts in zip(items, old, new, strict=True):
        for a, b in zip(old_counts, new_counts, strict=True):
            if a != b:
                mismatched += 1
                rle_a = {"size": list(hw), "counts": a}
                rle_b = {"size": list(hw), "counts": b}
                worst_iou = min(worst_iou, float(mask_utils.iou([rle_a], [rle_b], [0])[0, 0]))
    rows.append(
        [
            "before: jitted paste per (K, H, W)",
            f"{old_s:.1f}",
            str(old_compiles),
            f"{old_largest / 2**20:.0f} MiB",
        ]
    )
    rows.append(
        [
            "after: host paste per box region",
            f"{new_s:.1f}",
            str(new_compiles),
            f"{new_largest / 2**20:.1f} MiB",
        ]
    )
    compiles = counter.count
    _, canvas_s = timed(canvas_after, items)
    rows.append(
        [
            "after: canvas masks, stride 4 of 1344",
            f"{canvas_s:.1f}",
            str(counter.count - compiles),
            "-",
        ]
    )

    # predict's worst case: a 4000x3000 photo, 100 detections of large boxes.
    rng = np.random.default_rng(3)
    hw = (3000, 4000)
    corner = rng.uniform(0, 0.5, (100, 2)) * [4000, 3000]
    photo_boxes = np.concatenate([corner, corner + rng.uniform(200, 2000, (100, 2))], 1)
    photo = [
        (hw, photo_boxes.astype(np.float32), rng.uniform(size=(100, 28, 28)).astype(np.float32))
    ]
    tracemalloc.start()
    _, photo_s = timed(after, photo)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rows.append(
        [
            "after: one 4000x3000 photo, 100 detections",
            f"{photo_s:.1f}",
            "0",
            f"{peak / 2**20:.0f} MiB peak (before: {100 * 3000 * 4000 * 4 / 2**30:.1f} GiB float32)",
        ]
    )
    table = markdown_table(rows, ["case", "seconds", "XLA compilations", "largest mask memory"])
    timing = end_to_end(args.images)
    table += (
        "\n\nEnd to end, smoke Mask R-CNN on a synthetic COCO split of "
        f"{args.images} images (up to 100 detections each): input "
        f"{timing['input_s']:.1f} s, device {timing['device_s']:.1f} s (compilation included), "
        f"paste+RLE {timing['paste_rle_s']:.1f} s, ground truth {timing['ground_truth_s']:.1f} s, "
        f"COCOeval {timing['cocoeval_s']:.1f} s."
    )
    header = (
        f"{machine_line()}; {args.images} images of {args.sizes} sizes, {num_dets} detections "
        f"(28x28 masks); before and after give different RLEs for {mismatched} of {num_dets} "
        f"detections (smallest IoU between the two: {worst_iou:.4f})"
    )
    print(header)
    print(table)
    if not args.no_append:
        append_results(
            "Mask paste and RLE (`python experiments/benchmarks/paste.py`)", header, table
        )
    return 0 if worst_iou >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
