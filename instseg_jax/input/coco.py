"""Random-access source over a COCO instances JSON and its image folder (host side, NumPy).

A record is a plain dict that pickles cheaply into grain workers: the image path and sizes,
and per annotation its xyxy box, contiguous class index, crowd flag, id and raw segmentation
(polygons, compressed or uncompressed RLE). Masks are decoded later, in the workers, one at a
time, each kept over its own box only (instances.InstanceMasks).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from instseg_jax.input import report
from instseg_jax.input.images import BadSegmentation, DataError, ImageSizeMismatch, decode_image
from instseg_jax.input.instances import InstanceMasks, tight_crop

log = logging.getLogger(__name__)

# Annotations named one line each when a file is read; beyond these, one line counts the rest.
NAMED_ANNOTATION_PROBLEMS = 5


class CategoryIds:
    """Contiguous class index <-> the dataset's category id (sources set ``category_ids``)."""

    category_ids: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def category_id(self, class_index) -> np.ndarray:
        """Dataset category ids of contiguous class indices (for results files)."""
        return np.asarray(self.category_ids)[np.asarray(class_index)]


class CocoSource(CategoryIds):
    """Records of a COCO instances file.

    Args:
      annotation_file: COCO instances JSON.
      image_dir: folder the images' ``file_name`` are relative to.
      keep_empty: keep images without (non-crowd) annotations. Keep them for evaluation (they
        still count for false positives); training configs usually drop them.
      min_keypoints: drop images whose annotations hold fewer labelled keypoints (v > 0)
        than this (training with keypoints: detectron2's MIN_KEYPOINTS_PER_IMAGE, 1); the
        count is `num_few_keypoints_dropped`.
      check_files: fail now, naming the first missing image file, rather than mid-training.
      select_images: the file's image ids (sorted) -> the ids to keep (split_image_ids:
        input.eval_fraction's split of one file); `selected_image_ids` records them.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        keep_empty: bool = True,
        check_files: bool = True,
        select_images=None,
        min_keypoints: int = 0,
    ):
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        document = read_coco_json(self.annotation_file, "instances")
        check_required_fields(document, self.annotation_file)
        categories = sorted(document["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        self.class_names = [str(c["name"]) for c in categories]
        self._class_of = {cid: i for i, cid in enumerate(self.category_ids)}
        # Keypoints per instance: the longest "keypoints" name list of any category (COCO
        # person: 17); 0 when no category declares keypoints.
        self.num_keypoints = max((len(c.get("keypoints") or ()) for c in categories), default=0)

        by_image: dict[int, list[dict]] = {}
        for ann in document["annotations"]:
            if ann["category_id"] not in self._class_of:
                raise DataError(
                    f"{self.annotation_file}: annotation id {ann.get('id')} has category_id "
                    f"{ann['category_id']}, which is not in 'categories' "
                    f"{self.category_ids}; add the category or fix the annotation"
                )
            by_image.setdefault(ann["image_id"], []).append(ann)

        self.records: list[dict] = []
        self.num_empty_dropped = 0
        self.num_few_keypoints_dropped = 0
        problems = []
        images = sorted(document["images"], key=lambda im: im["id"])
        self.selected_image_ids = None  # every image of the file
        if select_images is not None:
            chosen = {int(i) for i in select_images([int(im["id"]) for im in images])}
            if not chosen:
                raise DataError(
                    f"{self.annotation_file}: its {len(images)} image(s) cannot be split into "
                    "training and evaluation images (input.eval_fraction); give a file of two "
                    "or more images, or an input.eval_split"
                )
            images = [im for im in images if int(im["id"]) in chosen]
            self.selected_image_ids = sorted(chosen)
        for image in images:
            anns = sorted(by_image.get(image["id"], []), key=lambda a: a["id"])
            if not keep_empty and not any(not a.get("iscrowd", 0) for a in anns):
                self.num_empty_dropped += 1
                continue
            if min_keypoints > 0 and labelled_keypoints(anns) < min_keypoints:
                self.num_few_keypoints_dropped += 1
                continue
            self.records.append(self._record(image, anns))
            problems += [p for p in map(annotation_problem, anns) if p]
        warn_annotation_problems(self.annotation_file, problems)
        if check_files:
            for record in self.records:
                if not os.path.exists(record["path"]):
                    raise DataError(
                        f"{record['path']}: image file of image id {record['image_id']} is "
                        f"missing (file_name in {self.annotation_file}); restore the file or "
                        "remove the image from the annotations"
                    )

    def _record(self, image: dict, anns: Sequence[dict]) -> dict:
        boxes = np.zeros((len(anns), 4), np.float32)
        for i, ann in enumerate(anns):
            boxes[i] = self._xyxy(ann)
        return {
            "image_id": int(image["id"]),
            "path": str(self.image_dir / image["file_name"]),
            "height": int(image["height"]),
            "width": int(image["width"]),
            "boxes": boxes,
            "classes": np.array([self._class_of[a["category_id"]] for a in anns], np.int32),
            "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
            "ann_ids": np.array([int(a["id"]) for a in anns], np.int64),
            "segmentations": [a.get("segmentation") for a in anns],
            **({"keypoints": self._keypoints(anns)} if self.num_keypoints else {}),
        }

    def _keypoints(self, anns: Sequence[dict]) -> np.ndarray:
        """float32[n, K, 3] (x, y, v) of the annotations' "keypoints" lists (v = 0 where an
        annotation has none): continuous pixel positions, COCO's pixel index + 0.5
        (input/keypoints.py)."""
        k = self.num_keypoints
        out = np.zeros((len(anns), k, 3), np.float32)
        for i, ann in enumerate(anns):
            values = ann.get("keypoints") or []
            if len(values) != 3 * k:
                if values:
                    raise DataError(
                        f"{self.annotation_file}: annotation id {ann.get('id')} has "
                        f"{len(values)} keypoint numbers, not 3 x {k} (x, y, v per keypoint of "
                        "its category); fix the list or remove it"
                    )
                continue
            points = np.asarray(values, np.float32).reshape(k, 3)
            points[:, :2] += 0.5
            points[points[:, 2] <= 0] = 0.0
            out[i] = points
        return out

    def _xyxy(self, ann: dict) -> tuple[float, float, float, float]:
        """The annotation's xyxy box; NaN when it has none (the box is then its mask's)."""
        bbox = ann.get("bbox")
        if bbox is None or (isinstance(bbox, list | tuple) and not bbox):
            return (np.nan,) * 4
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError) as error:
            raise DataError(
                f"{self.annotation_file}: annotation id {ann.get('id')} has bbox {bbox!r}, not "
                "[x, y, width, height]; fix it or remove the field (the box is then taken from "
                "the segmentation)"
            ) from error
        return (x, y, x + w, y + h)

    def __len__(self) -> int:
        return len(self.records)

    def instances_per_image(self) -> np.ndarray:
        """Non-crowd annotations of every record, from the annotation file alone."""
        return np.asarray([int((~r["iscrowd"]).sum()) for r in self.records], np.int64)

    def image_categories(self) -> list[np.ndarray]:
        """Class indices of every record's non-crowd annotations (repeat-factor sampling),
        from the annotation file alone."""
        return [r["classes"][~r["iscrowd"]] for r in self.records]

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def load(self, index: int, counts: np.ndarray | None = None) -> dict:
        """Decoded example: image uint8[H, W, 3], masks (InstanceMasks, read like
        bool[n, H, W]), xyxy boxes, classes, crowd flags. Bad annotations are dropped or clipped
        and counted in ``counts``.
        Raises UnreadableImage (naming the file) when the image cannot be decoded and
        ImageSizeMismatch when its size is not the annotation file's height x width, and
        BadSegmentation (naming the annotation id) for a segmentation that does not fit the
        image: all are images.UnusableExample, which the pipeline skips and counts."""
        counts = report.new_counts() if counts is None else counts
        record = self.records[index]
        image = decode_image(record["path"])
        height, width = image.shape[:2]
        check_image_size(
            (height, width),
            (record["height"], record["width"]),
            f"{record['path']}",
            f"{self.annotation_file} (image id {record['image_id']})",
        )
        instances = decode_instances(
            record["segmentations"],
            record["boxes"],
            height,
            width,
            counts,
            ann_ids=record["ann_ids"],
            where=f"{record['path']} (in {self.annotation_file})",
        )
        keep = instances.pop("keep")
        return {
            "image": image,
            **instances,
            "classes": record["classes"][keep],
            "iscrowd": record["iscrowd"][keep],
            "image_id": record["image_id"],
            **({"keypoints": record["keypoints"][keep]} if "keypoints" in record else {}),
        }


def labelled_keypoints(anns: Sequence[dict]) -> int:
    """Keypoints with visibility v > 0 over an image's annotations (COCO's x, y, v triples)."""
    return sum(
        int((np.asarray(a["keypoints"], np.float64)[2::3] > 0).sum())
        for a in anns
        if a.get("keypoints")
    )


def read_coco_json(path: Path, kind: str) -> dict:
    """The document of a COCO annotation file of `kind` ("instances", "panoptic"), with its
    "images", "annotations" and "categories" lists; DataError naming the file otherwise."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise DataError(f"{path}: {kind} annotation file not found") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    for field in ("images", "annotations", "categories"):
        if not isinstance(document, dict) or field not in document:
            raise DataError(f"{path}: no '{field}' list; not a COCO {kind} file")
    return document


def annotation_problem(ann: dict) -> str | None:
    """What the pipeline will drop or rebuild of an annotation, in words (None when nothing):
    polygons of fewer than 3 points (dropped; the annotation too when no polygon is left) and
    a bbox of zero or negative width or height (its box is then its mask's)."""
    words = []
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list) and segmentation:
        short = [p for p in segmentation if isinstance(p, list) and len(p) < 6]
        if short:
            points = ", ".join(str(len(p) // 2) for p in short)
            left = len(segmentation) - len(short)
            words.append(
                f"polygon of {points} point(s), fewer than 3: "
                + ("the annotation is dropped" if not left else "that polygon is ignored")
            )
    bbox = ann.get("bbox")
    if isinstance(bbox, list | tuple) and len(bbox) == 4:
        width, height = (float(v) for v in bbox[2:])
        if width <= 0 or height <= 0:
            side = "width" if width <= 0 else "height"
            sign = "negative" if min(width, height) < 0 else "zero"
            fate = (
                "its box is taken from its segmentation"
                if segmentation
                else "no segmentation either: the annotation is dropped"
            )
            words.append(f"bbox {list(bbox)} has a {sign} {side}; {fate}")
    if not words:
        return None
    return f"annotation id {ann.get('id')}: " + "; ".join(words)


_WARNED: set[tuple[str, str]] = set()  # (file, problem) already reported by this process


def warn_annotation_problems(annotation_file, problems: Sequence[str]) -> None:
    """One warning line per problem annotation of a file (the first few, then a count), each
    once per process: the training and evaluation splits may read the same file."""
    fresh = [p for p in problems if (str(annotation_file), p) not in _WARNED]
    _WARNED.update((str(annotation_file), p) for p in fresh)
    for problem in fresh[:NAMED_ANNOTATION_PROBLEMS]:
        log.warning("%s: %s", annotation_file, problem)
    if len(fresh) > NAMED_ANNOTATION_PROBLEMS:
        log.warning(
            "%s: %d more annotations with problems like these (dropped or their box rebuilt); "
            "the data report counts them",
            annotation_file,
            len(fresh) - NAMED_ANNOTATION_PROBLEMS,
        )


def split_image_ids(image_ids, fraction: float, seed: int, part: str) -> list[int]:
    """The "train" or "eval" part of a seeded split of image ids by image: round(fraction x n)
    of them (at least one, leaving at least one) held out for evaluation, the same for the
    same ids, fraction and seed whatever the order the ids come in."""
    ids = sorted(int(i) for i in image_ids)
    held_out = min(max(round(fraction * len(ids)), 1), len(ids) - 1)
    order = np.random.default_rng([int(seed), 0xE7A1]).permutation(len(ids))
    evaluation = {ids[k] for k in order[:held_out]}
    if part == "eval":
        return sorted(evaluation)
    return [i for i in ids if i not in evaluation]


# What every entry of a COCO instances file must carry here (bbox, segmentation, area and
# iscrowd may be absent), and which of those are integers.
REQUIRED_FIELDS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id"),
    "categories": ("id", "name"),
}
TEXT_FIELDS = ("file_name", "name")


def check_required_fields(document: dict, path) -> None:
    """DataError naming the file, the entry (its id, else its position) and the field, for an
    entry of "images", "annotations" or "categories" that is not an object, lacks a field of
    REQUIRED_FIELDS, or has a non-integer id, image_id, category_id, height or width."""
    for section, fields in REQUIRED_FIELDS.items():
        singular = section[:-1].replace("categorie", "category")
        for position, entry in enumerate(document[section]):
            if not isinstance(entry, dict):
                raise DataError(
                    f"{path}: entry {position} of '{section}' is a {type(entry).__name__}, not "
                    f"an object with {', '.join(fields)}"
                )
            name = (
                f"{singular} id {entry['id']}"
                if "id" in entry
                else f"{singular} {position} of '{section}'"
            )
            for field in fields:
                if field not in entry:
                    raise DataError(
                        f"{path}: {name} has no '{field}'; add it or remove the {singular}"
                    )
                value = entry[field]
                integer = isinstance(value, int | float) and not isinstance(value, bool)
                if field not in TEXT_FIELDS and not (integer and float(value).is_integer()):
                    raise DataError(f"{path}: {name} has {field} {value!r}, not an integer")


def check_image_size(image_hw, annotated_hw, image_name: str, annotated_in: str) -> None:
    """Raise ImageSizeMismatch (an example the pipeline skips and counts) when the decoded
    image's height x width differs from the one its annotations were made for."""
    (height, width), (want_h, want_w) = image_hw, annotated_hw
    if (height, width) == (int(want_h), int(want_w)):
        return
    hint = ""
    if (height, width) == (int(want_w), int(want_h)):
        hint = (
            " (height and width swapped: if the file carries an EXIF orientation tag, which is "
            "applied here as detectron2 does, the annotations were made on the unrotated "
            "pixels; drop the tag or annotate the upright image)"
        )
    raise ImageSizeMismatch(
        f"{image_name}: image is {height}x{width} (height x width) but {annotated_in} says "
        f"{int(want_h)}x{int(want_w)}{hint}; fix the height/width fields or the image"
    )


def decode_instances(
    segmentations,
    boxes,
    height: int,
    width: int,
    counts: np.ndarray,
    ann_ids=None,
    where: str = "image",
) -> dict:
    """Masks (InstanceMasks: each decoded in turn and kept over its tight box only) and tight
    xyxy boxes float32[n, 4] of the usable annotations.

    Annotations without a segmentation, and segmentations with no pixel inside the image (a
    zero-area box with an empty mask counts as zero_area_annotation), are dropped; boxes
    reaching outside the image are replaced by the mask's box, and so are missing boxes (NaN:
    an annotation without bbox) and boxes of zero or negative width or height whose mask is
    not empty. Each case is counted. ``keep``
    int64[n] indexes the kept annotations. A segmentation that does not fit the image raises
    BadSegmentation naming ``where`` (the image) and the annotation's id (``ann_ids``
    int64[len(segmentations)]).
    """
    keep, crops, origins, tight = [], [], [], []
    for i, segmentation in enumerate(segmentations):
        x0, y0, x1, y1 = boxes[i]
        no_box = bool(np.isnan(boxes[i]).any())
        bad_box = not no_box and (x1 - x0 <= 0 or y1 - y0 <= 0)
        if segmentation is None:
            report.count(counts, "zero_area_annotation")
            continue
        try:
            mask = decode_segmentation(segmentation, height, width)
        except BadSegmentation as error:
            name = f"annotation id {int(ann_ids[i])}" if ann_ids is not None else f"annotation {i}"
            raise BadSegmentation(f"{where}: {name}: {error}") from error
        crop, (top, left) = tight_crop(mask)
        del mask  # one full-resolution mask at a time
        if not crop.size:
            report.count(counts, "zero_area_annotation" if bad_box else "empty_mask")
            continue
        if no_box or bad_box:
            report.count(counts, "bbox_from_mask")
        elif x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            report.count(counts, "clipped_annotation")
        keep.append(i)
        crops.append(crop)
        origins.append((top, left))
        # The tight box of the mask: inside the image and consistent with the mask.
        tight.append((left, top, left + crop.shape[1], top + crop.shape[0]))
    return {
        "masks": InstanceMasks(crops, origins, (height, width)),
        "boxes": np.asarray(tight, np.float32).reshape(-1, 4),
        "keep": np.asarray(keep, np.int64),
    }


def mask_annotation(
    mask: np.ndarray,
    annotation_id: int,
    image_id: int,
    category_id: int,
    iscrowd: bool = False,
    keypoints: np.ndarray | None = None,
) -> dict:
    """A COCO annotation of a bool mask[H, W]: compressed RLE (str counts, JSON-ready), with
    area and box from pycocotools; keypoints[K, 3] (continuous pixel positions, written at
    COCO's pixel index: - 0.5) add "keypoints" and "num_keypoints"."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    extra = {}
    if keypoints is not None:
        points = np.asarray(keypoints, np.float64).copy()
        labelled = points[:, 2] > 0
        points[:, :2] = np.where(labelled[:, None], points[:, :2] - 0.5, 0.0)
        extra = {
            "keypoints": [float(v) for v in points.ravel()],
            "num_keypoints": int(labelled.sum()),
        }
    return {
        **extra,
        "id": int(annotation_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(iscrowd),
    }


def _check_rle(rle: dict, height: int, width: int) -> None:
    """Raise BadSegmentation when an RLE is not one of an H x W image."""
    size, counts = rle.get("size"), rle.get("counts")
    if size is None or counts is None:
        raise BadSegmentation(f"RLE without 'size' or 'counts' (keys {sorted(rle)})")
    try:
        rle_h, rle_w = (int(v) for v in size)
    except (TypeError, ValueError) as error:
        raise BadSegmentation(f"RLE 'size' {size!r} is not [height, width]") from error
    if (rle_h, rle_w) != (height, width):
        raise BadSegmentation(
            f"segmentation 'size' {rle_h}x{rle_w} (height x width) differs from the image's "
            f"{height}x{width}; encode the mask at the image's size"
        )
    if isinstance(counts, list) and sum(counts) != height * width:
        raise BadSegmentation(
            f"uncompressed RLE counts cover {sum(counts)} pixels, not the image's "
            f"{height}x{width} = {height * width}; re-encode the mask"
        )


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """bool[H, W] of a COCO segmentation: polygons, uncompressed or compressed RLE.

    Polygons are rasterised by pycocotools, which clips them to the image. Raises
    BadSegmentation (an example the pipeline skips and counts) for an RLE whose size is not
    H x W or whose counts do not cover it, an unknown format, or what pycocotools cannot read.
    """
    if isinstance(segmentation, dict):
        _check_rle(segmentation, height, width)
    try:
        if isinstance(segmentation, list):  # polygons
            polygons = [p for p in segmentation if len(p) >= 6]
            if not polygons:
                return np.zeros((height, width), bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
        elif isinstance(segmentation, dict):
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        else:
            raise BadSegmentation(f"unknown segmentation format {type(segmentation).__name__}")
        return mask_utils.decode(rle).astype(bool)
    except BadSegmentation:
        raise
    except (TypeError, ValueError, IndexError, UnicodeError) as error:
        raise BadSegmentation(f"pycocotools cannot read the segmentation ({error})") from error
