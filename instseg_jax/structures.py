"""The two contracts every method shares: what the input pipeline hands a model (Batch) and what
a model's evaluation pass hands back (Detections). Field by field, as `dtype[dims] meaning`.

Shape letters: B batch, H W canvas, N max ground-truth instances, I ignore regions, K
detections, C classes (no background), M box-relative mask side, Mc box-crop target side, s mask
stride.

Batch (host NumPy, then a global jax.Array sharded over the `data` mesh axis):
  image          uint8[B,H,W,3]   RGB canvas; the image sits at the top-left, padding after it
  image_hw       int32[B,2]       (h, w) of the valid region on the canvas
  orig_hw        int32[B,2]       (h, w) of the original image
  scale          float32[B]       canvas pixels per original pixel (input.resize "stretch": the
                                  geometric mean of scale_yx's two)
  scale_yx       float32[B,2]     (sy, sx) canvas pixels per original pixel along each axis
                                  (equal but for input.resize "stretch"); batches built by hand
                                  may leave it out: then both are `scale`
  crop_offset    int32[B,2]       (oy, ox) of the crop window in the scaled image (large-scale
                                  jitter); canvas (x, y) = scaled (x + ox, y + oy)
  flipped        bool[B]          the canvas is the horizontal mirror of the valid region
  image_id       int64[B]         dataset image id (host only; -1 for padding)
  example_valid  bool[B]          False for the padding of an evaluation's last batch
  gt_boxes       float32[B,N,4]   xyxy canvas pixels of the kept instances
  gt_classes     int32[B,N]       class index in [0, C)
  gt_valid       bool[B,N]        real instance (True) or padding
  ignore_boxes   float32[B,I,4]   xyxy canvas pixels of instances left out of the targets: those
                                  beyond input.max_instances (the largest I of them, I =
                                  input.max_ignore_regions; the rest are counted in the input
                                  report). Anchors, RoIs and cells that such a region covers
                                  (ops.assign.ignore_mask) take no label unless they are positive
                                  for a kept instance.
  ignore_valid   bool[B,I]        a real ignore region (True) or padding. Batches built by hand
                                  may leave both fields out: then nothing is ignored.
  gt_masks       uint8[B,N,Mc,Mc] when INPUTS.box_masks: each mask cropped to its own box
  gt_full_masks  uint8[B,N,H/s,W/s] when INPUTS.full_mask_stride = s: masks at the centres of
                                  the stride-s cells of the canvas
  gt_centers     float32[B,N,2]   when INPUTS.centers: (x, y) canvas mass centre of each mask
  gt_contours    float32[B,N,L,2] when INPUTS.contour_points = L: (x, y) canvas points on the
                                  boundary of each mask (the midpoints of its pixels' edges that
                                  face the background), L of them evenly by angle about their
                                  mean, repeated when there are fewer; clipped to the valid region
  gt_keypoints   float32[B,N,Kp,3] when INPUTS.keypoints: (x, y, v) canvas positions of the
                                  Kp keypoints of input.keypoints' set; v = 0 (and x = y = 0)
                                  for a point unlabelled or outside the valid region; on a
                                  flipped canvas left and right keypoints have swapped slots
  gt_semantic    uint8[B,H/s,W/s] when INPUTS.semantic_stride = s: Panoptic FPN's semantic
                                  classes at the stride-s cell centres: 0 things, 1 + k stuff
                                  class k, 255 ignored (unlabelled, padding)

Detections (a dict; K fixed by the method's config):
  boxes          float32[B,K,4]   xyxy in original image pixels; a method that predicts no boxes
                                  may leave the field out: the host takes them from the masks
  scores         float32[B,K]
  classes        int32[B,K]       class index in [0, C)
  valid          bool[B,K]        a real detection (True) or a padding slot
and at most one mask payload:
  masks          float32 or bfloat16[B,K,M,M] box-relative mask probabilities (Mask
                                  R-CNN's M = 28, PointRend's 224 in bfloat16): resampled
                                  bilinearly into each box at the original size
  canvas_masks   float32 or bfloat16[B,K,H/s,W/s] probabilities on the canvas at stride s
                                  (s = H / the payload's height): the host undoes the stride, the
                                  padding, the crop, the flip and the resize
  polygons       float32[B,K,V,2] (x, y) vertices in original image pixels (PolarMask's V = 36
                                  ray ends), rasterised on the host by pycocotools

and, for keypoint methods:
  keypoint_heatmaps float32[B,K,Kp,S,S] logits of each keypoint over its detection's box
  keypoint_boxes float32[B,K,4]   the canvas boxes the heatmaps cover
  keypoint_frame float32[B,3]     (rx, ry, shift): canvas-to-original scale per axis and the
                                  shift added to decoded positions (detections.py decodes them)

`instseg_jax.detections` turns either payload into binary masks and RLE at the original image's
pixels (host side, one image and one mask at a time), through the ImageGeometry below: where one
example's original image sits on the canvas, read from its Batch fields orig_hw, image_hw,
scale, crop_offset and flipped.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MASK_PAYLOADS = ("masks", "canvas_masks", "polygons")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a method needs from the input pipeline besides image, boxes and classes.

    box_masks: gt_masks, each instance's mask cropped to its box and resized to
      input.mask_size (Mc) square.
    full_mask_stride: s > 0 gives gt_full_masks at stride s of the canvas; 0 leaves them out.
    centers: gt_centers, the mass centre of each instance's mask on the canvas.
    contour_points: L > 0 gives gt_contours, L boundary points of each mask on the canvas.
    keypoints: gt_keypoints, the keypoints of input.keypoints' set for each instance.
    semantic_stride: s > 0 gives gt_semantic, the semantic map at stride s of the canvas.
    """

    box_masks: bool = False
    full_mask_stride: int = 0
    centers: bool = False
    contour_points: int = 0
    keypoints: bool = False
    semantic_stride: int = 0

    def __post_init__(self):
        if self.full_mask_stride < 0:
            raise ValueError(f"full_mask_stride must be >= 0, got {self.full_mask_stride}")
        if self.contour_points < 0:
            raise ValueError(f"contour_points must be >= 0, got {self.contour_points}")


def mask_payload(detections: dict) -> str | None:
    """The name of the detections' mask payload, or None for boxes only."""
    present = [name for name in MASK_PAYLOADS if name in detections]
    if len(present) > 1:
        raise ValueError(f"detections carry more than one mask payload: {present}")
    return present[0] if present else None


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """Where an original image sits on the canvas (one example of a Batch)."""

    orig_hw: tuple[int, int]
    image_hw: tuple[int, int]
    canvas_hw: tuple[int, int]
    scale: float
    crop_offset: tuple[int, int]  # (oy, ox)
    flipped: bool = False
    scale_yx: tuple[float, float] | None = None  # (sy, sx); None: both are `scale`

    def pixel_centres_on_canvas(self) -> tuple[np.ndarray, np.ndarray]:
        """(float64[H] rows, float64[W] columns): the original pixels' centres in canvas
        pixels, through the resize, the crop and the flip."""
        oy, ox = self.crop_offset
        height, width = self.orig_hw
        sy, sx = self.scale_yx or (self.scale, self.scale)
        canvas_y = (np.arange(height, dtype=np.float64) + 0.5) * sy - oy
        canvas_x = (np.arange(width, dtype=np.float64) + 0.5) * sx - ox
        if self.flipped:
            canvas_x = self.image_hw[1] - canvas_x
        return canvas_y, canvas_x

    @classmethod
    def of_batch(cls, batch: dict, b: int) -> ImageGeometry:
        return cls(
            orig_hw=tuple(int(v) for v in batch["orig_hw"][b]),
            image_hw=tuple(int(v) for v in batch["image_hw"][b]),
            canvas_hw=tuple(int(v) for v in np.shape(batch["image"])[1:3]),
            scale=float(batch["scale"][b]),
            crop_offset=tuple(int(v) for v in batch["crop_offset"][b]),
            flipped=bool(batch["flipped"][b]) if "flipped" in batch else False,
            scale_yx=(
                tuple(float(v) for v in batch["scale_yx"][b]) if "scale_yx" in batch else None
            ),
        )
