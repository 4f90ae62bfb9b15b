"""Keypoint sets a dataset can declare (`input.keypoints`): names, the left/right mirror of each
keypoint (a horizontal flip swaps them), the skeleton drawn in overlays and the OKS sigmas of
pycocotools' keypoint evaluation.

Coordinates: the pipeline holds keypoints as continuous pixel positions (x, y) with pixel
(c, r) covering [c, c + 1) x [r, r + 1), so a COCO annotation's integer pixel index gains 0.5
on loading (detectron2's convention) and a prediction loses it on output; visibility v is
COCO's (0 unlabelled, 1 labelled but hidden, 2 visible).
"""

from __future__ import annotations

import dataclasses

from instseg_jax.config import ConfigValueError


@dataclasses.dataclass(frozen=True)
class KeypointSet:
    names: tuple[str, ...]
    flip: tuple[int, ...]  # flip[k]: the index of keypoint k's mirror image (itself if none)
    skeleton: tuple[tuple[int, int], ...]  # pairs of indices joined in overlays
    sigmas: tuple[float, ...]  # pycocotools' per-keypoint OKS sigmas

    def __post_init__(self):
        k = len(self.names)
        if sorted(self.flip) != list(range(k)) or len(self.sigmas) != k:
            raise ValueError(f"keypoint set of {k}: flip must permute 0..{k - 1}, one sigma each")
        if any(self.flip[self.flip[i]] != i for i in range(k)):
            raise ValueError("keypoint flip must be its own inverse")

    @property
    def count(self) -> int:
        return len(self.names)


_COCO_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)


def _mirror_by_name(names):
    swapped = [
        n.replace("left", "\0").replace("right", "left").replace("\0", "right") for n in names
    ]
    return tuple(names.index(n) for n in swapped)


COCO_PERSON = KeypointSet(
    names=_COCO_NAMES,
    flip=_mirror_by_name(_COCO_NAMES),
    # detectron2's KEYPOINT_CONNECTION_RULES: head, arms, torso, legs.
    skeleton=(
        (3, 1),
        (4, 2),
        (1, 0),
        (0, 2),
        (5, 6),
        (5, 7),
        (7, 9),
        (6, 8),
        (8, 10),
        (11, 12),
        (11, 13),
        (13, 15),
        (12, 14),
        (14, 16),
    ),
    # pycocotools' defaults (cocoeval.py, Params.setKpParams).
    sigmas=tuple(
        s / 10.0
        for s in (
            0.26,
            0.25,
            0.25,
            0.35,
            0.35,
            0.79,
            0.79,
            0.72,
            0.72,
            0.62,
            0.62,
            1.07,
            1.07,
            0.87,
            0.87,
            0.89,
            0.89,
        )
    ),
)

_SHAPE_NAMES = ("top", "left", "right", "bottom", "centre")

# The synthetic scenes' keypoints (input/synthetic.py): each visible mask's extreme points (the
# mean pixel of its topmost row, leftmost column, ...) and its mass centre. A flip swaps left
# and right; sigma 0.05 leaves a point 1 px off an instance of 400 px^2 at OKS 0.88.
SYNTHETIC_SHAPES = KeypointSet(
    names=_SHAPE_NAMES,
    flip=_mirror_by_name(_SHAPE_NAMES),
    skeleton=((0, 4), (1, 4), (2, 4), (3, 4)),
    sigmas=(0.05,) * 5,
)

KEYPOINT_SETS = {"coco_person": COCO_PERSON, "synthetic_shapes": SYNTHETIC_SHAPES}


def keypoint_set(name: str) -> KeypointSet:
    """The KeypointSet of `input.keypoints`."""
    if name not in KEYPOINT_SETS:
        raise ConfigValueError(
            f"input.keypoints {name!r} is not a keypoint set; known: {sorted(KEYPOINT_SETS)} "
            "(a Keypoint R-CNN experiment names the one its data has)"
        )
    return KEYPOINT_SETS[name]
