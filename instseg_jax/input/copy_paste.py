"""Simple Copy-Paste (Ghiasi et al., CVPR 2021) on decoded examples (host side, NumPy).

The rule, as torchvision's references/detection/transforms.py (_copy_paste, SimpleCopyPaste)
applies it with large-scale jitter:

- a partner example is scale-jittered on its own (here: by a factor drawn from
  input.copy_paste_scale of its fit to this image, flipped with input.hflip, then cropped where
  it is larger than this image, or placed at a uniform offset where it is smaller: torchvision
  pads both images at their top left, but here this image fills its frame, so a top-left paste
  would always cover the same corner);
- a random subset of its instances is chosen as torchvision does: k integers drawn from [0, k)
  with repeats, duplicates collapsed (each instance chosen with probability 1 - (1 - 1/k)^k);
- the union of their masks is the pasted region. torchvision's blending=True Gaussian-blurs that
  boolean mask (5x5, sigma 2) and casts the result back to bool, so any pixel the kernel reaches
  turns True: the region grows by 2 px (a 5x5 square dilation), and the image pixels and the
  occlusion of this image's masks both use the grown region. input.copy_paste_blend keeps that
  (True) or pastes the union alone (False). The region never leaves the partner's window;
- this image's pixels inside the region are replaced by the partner's; each of its masks loses
  the region; an instance whose remains have fewer than input.copy_paste_min_area pixels is
  dropped and counted (report kind copy_paste_occluded: torchvision drops empty remains and, in
  effect, ones a single row or column thick, whose inclusive masks_to_boxes box is degenerate;
  here such slivers keep 1 px boxes and the transform's input.min_box_size rule judges them on
  the canvas); boxes of occluded instances are recomputed from their remains, the others keep
  theirs; the pasted instances follow, their boxes the tight boxes of their masks.

Crowd regions: the partner's are never pasted (they are not objects); this image's are
occluded like its instances (their remains stay crowd regions, which training drops and counts
as before). Ignore regions (the boxes of instances beyond input.max_instances) are made by the
transform afterwards, from the pasted example's instances. Keypoints and semantic maps are not
pasted: TransformConfig refuses copy-paste for methods that train on them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from instseg_jax.input import report
from instseg_jax.input.instances import InstanceMasks, tight_crop

# Keys the random generator of an example's copy-paste apart from its transform's.
COPY_PASTE_SALT = 0xC097_9A57

# The growth of torchvision's blending: half its 5x5 Gaussian kernel.
BLEND_RADIUS = 2


@dataclasses.dataclass
class PlacedPartner:
    """A partner scaled, flipped and placed in this image's frame: its pixels over the window
    rows y0..y0+h, columns x0..x0+w of the frame, and its non-crowd instances that remain
    visible there (crops in frame coordinates)."""

    pixels: np.ndarray  # uint8[h, w, 3]
    window: tuple[int, int, int, int]  # (y0, x0, h, w)
    crops: list[np.ndarray]
    origins: list[tuple[int, int]]
    classes: np.ndarray  # int32[k]


def _window(size: int, frame: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(first source row, first frame row, rows) of a source of `size` rows in a frame of
    `frame` rows: a random crop where it is larger, a random offset where it is smaller."""
    if size > frame:
        return int(rng.integers(0, size - frame + 1)), 0, frame
    return 0, int(rng.integers(0, frame - size + 1)), size


def _nearest_sources(first: int, count: int, resized: int, original: int, flip: bool):
    """int64[count]: the original pixel each of resized pixels first..first+count-1 reads,
    nearest to its centre (a flipped axis reads resized pixel resized - 1 - i)."""
    positions = first + np.arange(count, dtype=np.int64)
    if flip:
        positions = resized - 1 - positions
    # floor((p + 0.5) * original / resized), in integers
    return np.minimum((2 * positions + 1) * original // (2 * resized), original - 1)


def place_partner(partner: dict, hw, config, rng: np.random.Generator) -> PlacedPartner:
    """The partner example scaled by its own jitter into a frame of hw (this image's size)."""
    height, width = hw
    image = partner["image"]
    partner_h, partner_w = image.shape[:2]
    fit = min(height / partner_h, width / partner_w)
    scale = fit * rng.uniform(*config.copy_paste_scale)
    scaled_h, scaled_w = max(1, round(partner_h * scale)), max(1, round(partner_w * scale))
    flip = bool(rng.uniform() < config.hflip)
    crop_y, frame_y, rows = _window(scaled_h, height, rng)
    crop_x, frame_x, cols = _window(scaled_w, width, rng)

    resized = np.asarray(Image.fromarray(image).resize((scaled_w, scaled_h), Image.BILINEAR))
    if flip:
        resized = resized[:, ::-1]
    pixels = np.ascontiguousarray(resized[crop_y : crop_y + rows, crop_x : crop_x + cols])

    # Masks follow nearest-neighbour (torchvision resizes masks with NEAREST), read from each
    # instance's crop only: the source rows and columns of the window are monotonic, so the
    # window pixels that read a crop form one block.
    source_rows = _nearest_sources(crop_y, rows, scaled_h, partner_h, False)
    source_cols = _nearest_sources(crop_x, cols, scaled_w, partner_w, flip)
    masks = InstanceMasks.from_dense(partner["masks"])
    crowd = np.asarray(partner["iscrowd"], bool)
    crops, origins, classes = [], [], []
    for i in range(len(masks)):
        if crowd[i]:
            continue
        crop = masks.crops[i]
        top, left = (int(v) for v in masks.origins[i])
        in_rows = np.flatnonzero((source_rows >= top) & (source_rows < top + crop.shape[0]))
        in_cols = np.flatnonzero((source_cols >= left) & (source_cols < left + crop.shape[1]))
        if not len(in_rows) or not len(in_cols):
            continue
        block = crop[source_rows[in_rows] - top][:, source_cols[in_cols] - left]
        placed, (dy, dx) = tight_crop(block)
        if not placed.size:
            continue
        crops.append(placed)
        origins.append((frame_y + int(in_rows[0]) + dy, frame_x + int(in_cols[0]) + dx))
        classes.append(int(partner["classes"][i]))
    return PlacedPartner(
        pixels, (frame_y, frame_x, rows, cols), crops, origins, np.asarray(classes, np.int32)
    )


def chosen_instances(count: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision's random subset of `count` instances: `count` draws from [0, count),
    duplicates collapsed (sorted)."""
    return np.unique(rng.integers(0, count, count))


def grown(mask: np.ndarray, radius: int) -> np.ndarray:
    """bool[H, W]: mask dilated by a (2 radius + 1) square, nothing beyond the image."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    rows = np.zeros((height, width + 2 * radius), bool)
    for d in range(2 * radius + 1):
        rows |= padded[d : d + height]
    out = np.zeros((height, width), bool)
    for d in range(2 * radius + 1):
        out |= rows[:, d : d + width]
    return out


def paste(example: dict, partner: dict, config, rng: np.random.Generator, counts) -> dict:
    """`example` with instances of `partner` pasted on (module docstring), in decoded space.
    An example whose partner has no visible non-crowd instance is returned as it is."""
    image = example["image"]
    hw = image.shape[:2]
    placed = place_partner(partner, hw, config, rng)
    if not placed.crops:
        return example
    chosen = chosen_instances(len(placed.crops), rng)

    region = np.zeros(hw, bool)
    for i in chosen:
        crop, (top, left) = placed.crops[i], placed.origins[i]
        region[top : top + crop.shape[0], left : left + crop.shape[1]] |= crop
    y0, x0, rows, cols = placed.window
    if config.copy_paste_blend:
        inside = np.zeros(hw, bool)
        inside[y0 : y0 + rows, x0 : x0 + cols] = True
        region = grown(region, BLEND_RADIUS) & inside
    pasted_image = image.copy()
    window = pasted_image[y0 : y0 + rows, x0 : x0 + cols]
    covered = region[y0 : y0 + rows, x0 : x0 + cols]
    window[covered] = placed.pixels[covered]

    masks = InstanceMasks.from_dense(example["masks"])
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
    kept, crops, origins, new_boxes = [], [], [], []
    dropped = 0
    for i in range(len(masks)):
        crop = masks.crops[i]
        top, left = (int(v) for v in masks.origins[i])
        hidden = region[top : top + crop.shape[0], left : left + crop.shape[1]]
        if not (crop & hidden).any():  # untouched: its mask and box as they were
            kept.append(i)
            crops.append(crop)
            origins.append((top, left))
            new_boxes.append(boxes[i])
            continue
        remains = crop & ~hidden
        if int(remains.sum()) < max(1, int(config.copy_paste_min_area)):
            dropped += 1
            continue
        remains, (dy, dx) = tight_crop(remains)
        kept.append(i)
        crops.append(remains)
        origins.append((top + dy, left + dx))
        new_boxes.append(
            (left + dx, top + dy, left + dx + remains.shape[1], top + dy + remains.shape[0])
        )
    if dropped:
        report.count(counts, "copy_paste_occluded", dropped)
    for i in chosen:
        crop, (top, left) = placed.crops[i], placed.origins[i]
        crops.append(crop)
        origins.append((top, left))
        new_boxes.append((left, top, left + crop.shape[1], top + crop.shape[0]))

    kept = np.asarray(kept, np.int64)
    out = {k: v for k, v in example.items() if k not in ("keypoints", "semantic")}
    out.update(
        image=pasted_image,
        masks=InstanceMasks(crops, origins, hw),
        boxes=np.asarray(new_boxes, np.float32).reshape(-1, 4),
        classes=np.concatenate(
            [np.asarray(example["classes"], np.int32)[kept], placed.classes[chosen]]
        ),
        iscrowd=np.concatenate(
            [np.asarray(example["iscrowd"], bool)[kept], np.zeros(len(chosen), bool)]
        ),
    )
    return out
