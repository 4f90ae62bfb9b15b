"""Seeded synthetic scenes: circles, rectangles and triangles that overlap and occlude.

Every scene is a pure function of (seed, index): the same seed gives identical bytes on every
machine (NumPy's PCG64 and integer-exact rasterisation). Instance masks are exact: each is what
remains visible of its shape after the shapes drawn above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from instseg_jax.input.instances import mask_box
from instseg_jax.input.keypoints import SYNTHETIC_SHAPES

CLASS_NAMES = ("circle", "rectangle", "triangle")


def _triangle_mask(yy, xx, corners) -> np.ndarray:
    (ax, ay), (bx, by), (cx, cy) = corners

    def side(px, py, qx, qy):
        return (qx - px) * (yy - py) - (qy - py) * (xx - px)

    d1, d2, d3 = side(ax, ay, bx, by), side(bx, by, cx, cy), side(cx, cy, ax, ay)
    negative = (d1 < 0) | (d2 < 0) | (d3 < 0)
    positive = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(negative & positive)


class SyntheticSource:
    """A random-access source of ``length`` seeded scenes on a ``canvas_hw`` image.

    load(index) returns an example dict like the COCO source's: image uint8[H, W, 3],
    masks bool[n, H, W], boxes float32[n, 4] (xyxy, tight, +1 on the max side like COCO's
    mask boxes), classes int32[n], iscrowd bool[n], image_id, keypoints float32[n, 5, 3]
    (`shape_keypoints`).
    """

    class_names: Sequence[str] = CLASS_NAMES
    keypoint_names: Sequence[str] = SYNTHETIC_SHAPES.names

    def __init__(
        self,
        length: int = 64,
        canvas_hw=(128, 128),
        seed: int = 0,
        max_shapes: int = 8,
        min_size: int = 8,
        stuff: bool = False,
    ):
        self.stuff = bool(stuff)
        self.length = int(length)
        self.canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        self.seed = int(seed)
        self.max_shapes = int(max_shapes)
        self.min_size = int(min_size)

    @property
    def num_classes(self) -> int:
        return len(CLASS_NAMES)

    def __len__(self) -> int:
        return self.length

    def category_id(self, class_index) -> np.ndarray:
        return np.asarray(class_index) + 1

    @property
    def stuff_names(self) -> list[str]:
        return list(STUFF_NAMES) if self.stuff else []

    @property
    def stuff_category_ids(self) -> list[int]:
        """The stuff bands' category ids, after the things' (one id space, as COCO panoptic)."""
        return [len(CLASS_NAMES) + 1 + k for k in range(len(self.stuff_names))]

    def image_ids(self) -> list[int]:
        return list(range(self.length))

    def image_categories(self) -> list[np.ndarray]:
        """Class indices of every scene's shapes (repeat-factor sampling). A scene has no
        annotations apart from itself: each is drawn, and a shape another hides entirely is
        not in it."""
        return [self.load(i)["classes"] for i in range(self.length)]

    def panoptic_ground_truth(self, index: int):
        """(image id, int32[H, W] panoptic ids, segments) of scene index (stuff scenes only)."""
        if not self.stuff:
            raise ValueError("panoptic ground truth needs stuff scenes (input.synthetic_stuff)")
        example = self.load(index)
        thing_ids = [int(i) for i in self.category_id(np.arange(self.num_classes))]
        panoptic, segments = ground_truth_map(example, thing_ids, self.stuff_category_ids)
        return int(example["image_id"]), panoptic, segments

    def load(self, index: int, counts=None) -> dict:
        del counts  # synthetic scenes have no bad data to count
        if not 0 <= index < self.length:
            raise IndexError(f"synthetic index {index} outside [0, {self.length})")
        rng = np.random.default_rng([self.seed, index])
        height, width = self.canvas_hw
        yy, xx = np.mgrid[:height, :width]
        background = rng.integers(0, 80, 3)
        image = np.empty((height, width, 3), np.uint8)
        image[:] = background + rng.integers(0, 20, (height, width, 1))
        num = int(rng.integers(1, self.max_shapes + 1))
        shapes, classes = [], []
        biggest = max(self.min_size + 1, min(height, width) // 2)
        for _ in range(num):
            cls = int(rng.integers(0, 3))
            size = int(rng.integers(self.min_size, biggest))
            cy = int(rng.integers(0, height))
            cx = int(rng.integers(0, width))
            if cls == 0:
                shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 2) ** 2
            elif cls == 1:
                h, w = size, int(rng.integers(self.min_size, biggest))
                shape = (abs(yy - cy) <= h // 2) & (abs(xx - cx) <= w // 2)
            else:
                offsets = rng.integers(-size, size + 1, (3, 2))
                offsets[0] = (0, -size)  # keep the triangle from collapsing to a line
                shape = _triangle_mask(yy, xx, [(cx + dx, cy + dy) for dx, dy in offsets])
            shapes.append(shape)
            classes.append(cls)
        # Draw in order: later shapes occlude earlier ones.
        masks = np.zeros((num, height, width), bool)
        taken = np.zeros((height, width), bool)
        for i in reversed(range(num)):
            masks[i] = shapes[i] & ~taken
            taken |= shapes[i]
        semantic = None
        if self.stuff:  # its own random stream: the things are those of stuff=False
            semantic = _stuff_bands(image, np.random.default_rng([self.seed, index, 1]))
        for i in range(num):
            colour = rng.integers(90, 256, 3)
            image[masks[i]] = colour
        keep = masks.reshape(num, -1).any(axis=1)
        masks = masks[keep]
        classes = np.asarray(classes, np.int32)[keep]
        boxes = np.zeros((len(masks), 4), np.float32)
        for i, mask in enumerate(masks):
            boxes[i] = mask_box(mask)
        return {
            "image": image,
            "masks": masks,
            "boxes": boxes,
            "classes": classes,
            "iscrowd": np.zeros(len(masks), bool),
            "image_id": int(index),
            "keypoints": shape_keypoints(masks),
            **({} if semantic is None else {"semantic": _semantic(semantic, masks)}),
        }


STUFF_NAMES = ("sky", "ground")


def _stuff_bands(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint textured stuff bands into image (in place) and return their class map uint8[H, W]
    (1 + index into STUFF_NAMES, 0 elsewhere): a "sky" band at the top with a vertical colour
    ramp and a "ground" band at the bottom with diagonal stripes, each 20-40% of the height."""
    height, width = image.shape[:2]
    top = int(rng.integers(height // 5, 2 * height // 5 + 1))
    bottom = height - int(rng.integers(height // 5, 2 * height // 5 + 1))
    classes = np.zeros((height, width), np.uint8)
    classes[:top] = 1
    classes[bottom:] = 2
    sky = rng.integers(40, 120, 3)
    ramp = np.linspace(0, 60, max(top, 1))[:, None, None]
    image[:top] = np.clip(sky + ramp, 0, 255).astype(np.uint8)
    ground = rng.integers(40, 140, 3)
    period = int(rng.integers(4, 9))
    yy, xx = np.mgrid[bottom:height, :width]
    stripes = ((xx + yy) // period) % 2
    image[bottom:] = np.clip(ground + 50 * stripes[..., None], 0, 255).astype(np.uint8)
    return classes


def _semantic(stuff: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8[H, W] semantic ground truth in Panoptic FPN's layout: 0 on things (any instance),
    1 + s on stuff class s, 255 (ignored) where neither is."""
    out = np.where(stuff > 0, stuff, 255).astype(np.uint8)
    if len(masks):
        out[masks.any(axis=0)] = 0
    return out


def shape_keypoints(masks: np.ndarray) -> np.ndarray:
    """float32[n, 5, 3] keypoints of each visible mask[n, H, W] (input/keypoints.py's
    "synthetic_shapes"): the mean pixel of its topmost row, leftmost column, rightmost column and
    bottom row, and its mass centre, as continuous positions (pixel centres), all visible (2).
    Means make them mirror exactly under a flip."""
    out = np.zeros((len(masks), 5, 3), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.nonzero(mask)
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        points = [
            (cols[rows == top].mean(), top),
            (left, rows[cols == left].mean()),
            (right, rows[cols == right].mean()),
            (cols[rows == bottom].mean(), bottom),
            (cols.mean(), rows.mean()),
        ]
        out[i, :, :2] = np.asarray(points, np.float64) + 0.5
        out[i, :, 2] = 2.0
    return out


def write_coco(source: SyntheticSource, folder, split: str = "val") -> tuple:
    """Write a synthetic source as PNG images + a COCO instances JSON (RLE masks).

    For evaluation tests and for the demo when no real data exists. Returns the
    (annotation file, image folder) pair.
    """
    import json
    from pathlib import Path

    from PIL import Image

    from instseg_jax.input.coco import mask_annotation

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(len(source)):
        example = source.load(index)
        name = f"{split}_{index:05d}.png"
        Image.fromarray(example["image"]).save(folder / "images" / name)
        height, width = example["image"].shape[:2]
        images.append({"id": index + 1, "file_name": name, "height": height, "width": width})
        for mask, cls, points in zip(
            example["masks"], example["classes"], example["keypoints"], strict=True
        ):
            annotations.append(
                mask_annotation(mask, len(annotations) + 1, index + 1, cls + 1, keypoints=points)
            )
    shapes = SYNTHETIC_SHAPES
    skeleton = [[a + 1, b + 1] for a, b in shapes.skeleton]  # COCO's 1-based indices
    categories = [
        {"id": i + 1, "name": n, "keypoints": list(shapes.names), "skeleton": skeleton}
        for i, n in enumerate(CLASS_NAMES)
    ]
    path = folder / f"{split}.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path, folder / "images"


def ground_truth_map(example: dict, thing_category_ids, stuff_category_ids):
    """(int32[H, W] panoptic ids, segments) of a decoded example with bool masks[n, H, W],
    classes, iscrowd and a semantic map (0 things, 1 + k stuff k, 255 unlabelled): one segment
    per instance (crowd ones flagged), one per stuff class present on pixels no instance
    covers."""
    masks = np.asarray(example["masks"], bool)
    semantic = np.asarray(example["semantic"])
    panoptic = np.zeros(semantic.shape, np.int32)
    segments = []
    for mask, cls, crowd in zip(masks, example["classes"], example["iscrowd"], strict=True):
        segment_id = len(segments) + 1
        panoptic[mask & (panoptic == 0)] = segment_id
        segments.append(
            {
                "id": segment_id,
                "category_id": int(thing_category_ids[int(cls)]),
                "iscrowd": int(bool(crowd)),
            }
        )
    for stuff in range(1, len(stuff_category_ids) + 1):
        mask = (semantic == stuff) & (panoptic == 0)
        if mask.any():
            segment_id = len(segments) + 1
            panoptic[mask] = segment_id
            segments.append({"id": segment_id, "category_id": int(stuff_category_ids[stuff - 1])})
    return panoptic, segments


def write_coco_panoptic(source: SyntheticSource, folder, split: str = "val") -> tuple:
    """Write a stuff source (stuff=True) in COCO's panoptic format: PNG images, panoptic PNGs
    and the panoptic JSON (input/coco_panoptic.py). Segment ids start at 1000 + 300 * index,
    so they span the PNG's three channels. For tests of the panoptic source and evaluation.
    Returns (annotation file, image folder, panoptic PNG folder)."""
    import json
    from pathlib import Path

    from PIL import Image

    from instseg_jax.input.coco_panoptic import id_to_rgb

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "panoptic").mkdir(parents=True, exist_ok=True)
    thing_ids = [i + 1 for i in range(len(CLASS_NAMES))]
    stuff_ids = source.stuff_category_ids
    images, annotations = [], []
    for index in range(len(source)):
        example = source.load(index)
        height, width = example["image"].shape[:2]
        name = f"{split}_{index:05d}"
        Image.fromarray(example["image"]).save(folder / "images" / f"{name}.png")
        panoptic, segments = ground_truth_map(example, thing_ids, stuff_ids)
        base = 1000 + 300 * index  # ids of every image distinct, as in COCO's files
        ids = np.where(panoptic > 0, panoptic + base, 0)
        Image.fromarray(id_to_rgb(ids)).save(folder / "panoptic" / f"{name}.png")
        info = []
        for segment in segments:
            mask = panoptic == segment["id"]
            x0, y0, x1, y1 = mask_box(mask)
            info.append(
                {
                    "id": segment["id"] + base,
                    "category_id": segment["category_id"],
                    "iscrowd": segment.get("iscrowd", 0),
                    "area": int(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                }
            )
        image_id = int(example["image_id"])
        images.append(
            {"id": image_id, "file_name": f"{name}.png", "height": height, "width": width}
        )
        annotations.append(
            {"image_id": image_id, "file_name": f"{name}.png", "segments_info": info}
        )
    categories = [
        {"id": i, "name": n, "isthing": 1} for i, n in zip(thing_ids, CLASS_NAMES, strict=True)
    ]
    categories += [
        {"id": i, "name": n, "isthing": 0}
        for i, n in zip(stuff_ids, source.stuff_names, strict=True)
    ]
    path = folder / f"panoptic_{split}.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path, folder / "images", folder / "panoptic"
