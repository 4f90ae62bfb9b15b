"""Random-access source over COCO's panoptic format: a JSON of segments and one PNG per image.

The format (cocodataset.org/#format-data, "Panoptic Segmentation"): the JSON has "images",
"categories" (each with "isthing") and "annotations", one per image, naming its PNG
("file_name") and listing its segments ("segments_info": id, category_id, iscrowd, bbox,
area). A PNG pixel's segment id is R + 256 G + 256^2 B; id 0 and ids no segment lists are
unlabelled (void).

What a panoptic model trains on, per image (the example dict of the other sources):
- the "thing" segments as instances: bool masks, xyxy boxes (tight, +1 on the max side like
  COCO's mask boxes), contiguous class indices over the thing categories, crowd flags;
- "semantic" uint8[H, W] in Panoptic FPN's layout: 0 on every thing pixel (crowd included),
  1 + k on stuff category k (stuff categories in id order), 255 on void.
Evaluation reads the map itself (panoptic_ground_truth). Masks come from the PNG, so a thing's
mask is what is visible of it (no overlaps), as the panoptic annotation defines it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from instseg_jax.input import report
from instseg_jax.input.coco import CategoryIds, check_image_size, read_coco_json
from instseg_jax.input.images import DataError, UnusableExample, decode_image
from instseg_jax.input.instances import mask_box

IGNORE = 255


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """int32[H, W] segment ids of a panoptic PNG's uint8[H, W, 3] pixels."""
    rgb = np.asarray(rgb, np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] PNG pixels of int[H, W] segment ids (ids below 256^3)."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


class CocoPanopticSource(CategoryIds):
    """Records of a COCO panoptic JSON, its image folder and its PNG folder.

    Args:
      annotation_file: the panoptic JSON (e.g. panoptic_val2017.json).
      image_dir: folder of the images (the "images" entries' file_name).
      panoptic_dir: folder of the PNGs (the "annotations" entries' file_name).
      keep_empty: keep images without non-crowd thing segments (evaluation keeps them;
        training drops them, as detectron2's FILTER_EMPTY_ANNOTATIONS).
      check_files: fail now, naming the first missing image or PNG, rather than mid-training.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        panoptic_dir: str | os.PathLike,
        keep_empty: bool = True,
        check_files: bool = True,
    ):
        # Named panoptic_file, not annotation_file: evaluation builds the instance ground
        # truth from the PNGs (evaluate.ground_truth), not from an instances JSON.
        self.panoptic_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.panoptic_dir = Path(panoptic_dir)
        document = read_coco_json(self.panoptic_file, "panoptic")
        categories = sorted(document["categories"], key=lambda c: c["id"])
        for category in categories:
            if "isthing" not in category:
                raise DataError(
                    f"{self.panoptic_file}: category {category.get('id')} "
                    f"({category.get('name')}) has no 'isthing'; a panoptic file marks every "
                    "category as thing (1) or stuff (0)"
                )
        things = [c for c in categories if c["isthing"]]
        stuff = [c for c in categories if not c["isthing"]]
        self.category_ids = [int(c["id"]) for c in things]
        self.class_names = [str(c["name"]) for c in things]
        self.stuff_category_ids = [int(c["id"]) for c in stuff]
        self.stuff_names = [str(c["name"]) for c in stuff]
        self._class_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self._stuff_of = {cid: i for i, cid in enumerate(self.stuff_category_ids)}

        by_image = {}
        for ann in document["annotations"]:
            for segment in ann.get("segments_info", []):
                if segment["category_id"] not in self._class_of | self._stuff_of:
                    raise DataError(
                        f"{self.panoptic_file}: segment {segment.get('id')} of image "
                        f"{ann.get('image_id')} has category_id {segment['category_id']}, "
                        "which is not in 'categories'; add the category or fix the segment"
                    )
            by_image[ann["image_id"]] = ann
        self.records: list[dict] = []
        self.num_empty_dropped = 0
        for image in sorted(document["images"], key=lambda im: im["id"]):
            ann = by_image.get(image["id"])
            if ann is None:
                raise DataError(
                    f"{self.panoptic_file}: image id {image['id']} ({image.get('file_name')}) "
                    "has no entry in 'annotations'; a panoptic file annotates every image"
                )
            segments = [
                {
                    "id": int(s["id"]),
                    "category_id": int(s["category_id"]),
                    "iscrowd": int(bool(s.get("iscrowd", 0))),
                }
                for s in ann.get("segments_info", [])
            ]
            if not keep_empty and not any(
                s["category_id"] in self._class_of and not s["iscrowd"] for s in segments
            ):
                self.num_empty_dropped += 1
                continue
            self.records.append(
                {
                    "image_id": int(image["id"]),
                    "path": str(self.image_dir / image["file_name"]),
                    "panoptic_path": str(self.panoptic_dir / ann["file_name"]),
                    "height": int(image["height"]),
                    "width": int(image["width"]),
                    "segments": segments,
                }
            )
        if check_files:
            for record in self.records:
                for key, what in (("path", "image"), ("panoptic_path", "panoptic PNG")):
                    if not os.path.exists(record[key]):
                        raise DataError(
                            f"{record[key]}: {what} of image id {record['image_id']} is missing "
                            f"(file_name in {self.panoptic_file}); restore the file or remove "
                            "the image from the annotations"
                        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def image_ids(self) -> list[int]:
        return [r["image_id"] for r in self.records]

    def instances_per_image(self) -> np.ndarray:
        """Non-crowd thing segments of every record, from the JSON alone."""
        return np.asarray(
            [
                sum(s["category_id"] in self._class_of and not s["iscrowd"] for s in r["segments"])
                for r in self.records
            ],
            np.int64,
        )

    def image_categories(self) -> list[np.ndarray]:
        """Class indices of every record's non-crowd thing segments, from the JSON alone."""
        return [
            np.asarray(
                [
                    self._class_of[s["category_id"]]
                    for s in r["segments"]
                    if s["category_id"] in self._class_of and not s["iscrowd"]
                ],
                np.int64,
            )
            for r in self.records
        ]

    def _segment_ids(self, record: dict, counts: np.ndarray | None) -> np.ndarray:
        """int32[H, W] of the record's PNG, ids no segment lists set to 0 (void, counted)."""
        path = record["panoptic_path"]
        ids = rgb_to_id(decode_image(path))
        check_image_size(
            ids.shape,
            (record["height"], record["width"]),
            path,
            f"{self.panoptic_file} (image id {record['image_id']})",
        )
        listed = np.asarray([s["id"] for s in record["segments"]] + [0], np.int64)
        unlisted = ~np.isin(ids, listed)
        if unlisted.any():
            if counts is not None:
                report.count(counts, "unlisted_panoptic_segment", len(np.unique(ids[unlisted])))
            ids = np.where(unlisted, 0, ids)
        return ids.astype(np.int32)

    def load(self, index: int, counts: np.ndarray | None = None) -> dict:
        """Decoded example (module docstring). Raises UnreadableImage or ImageSizeMismatch
        (images.UnusableExample: the pipeline skips and counts the example) for an image or PNG
        that cannot be read or does not have the JSON's size; thing segments with no pixel are
        dropped and counted (empty_mask)."""
        counts = report.new_counts() if counts is None else counts
        record = self.records[index]
        image = decode_image(record["path"])
        check_image_size(
            image.shape[:2],
            (record["height"], record["width"]),
            record["path"],
            f"{self.panoptic_file} (image id {record['image_id']})",
        )
        ids = self._segment_ids(record, counts)
        semantic = np.full(ids.shape, IGNORE, np.uint8)
        masks, boxes, classes, crowd = [], [], [], []
        for segment in record["segments"]:
            mask = ids == segment["id"]
            category = segment["category_id"]
            if category in self._stuff_of:
                semantic[mask] = 1 + self._stuff_of[category]
                continue
            semantic[mask] = 0
            box = mask_box(mask)
            if box is None:
                report.count(counts, "empty_mask")
                continue
            masks.append(mask)
            boxes.append(box)
            classes.append(self._class_of[category])
            crowd.append(bool(segment["iscrowd"]))
        height, width = ids.shape
        return {
            "image": image,
            "masks": np.asarray(masks, bool).reshape(len(masks), height, width),
            "boxes": np.asarray(boxes, np.float32).reshape(len(masks), 4),
            "classes": np.asarray(classes, np.int32),
            "iscrowd": np.asarray(crowd, bool),
            "image_id": record["image_id"],
            "semantic": semantic,
        }

    def instance_ground_truth(self, index: int) -> dict:
        """The thing segments of record index as evaluation's instance ground truth (masks,
        classes, crowd flags, image id, height, width), from its PNG alone: no image decoded.
        Raises images.UnusableExample for a PNG that cannot be read or has another size."""
        record = self.records[index]
        ids = self._segment_ids(record, None)
        things = [s for s in record["segments"] if s["category_id"] in self._class_of]
        masks = np.zeros((len(things), *ids.shape), bool)
        for mask, segment in zip(masks, things, strict=True):
            mask[...] = ids == segment["id"]
        keep = masks.reshape(len(things), -1).any(axis=1)
        classes = np.asarray([self._class_of[s["category_id"]] for s in things], np.int32)
        crowd = np.asarray([bool(s["iscrowd"]) for s in things], bool)
        return {
            "masks": masks[keep],
            "classes": classes[keep],
            "iscrowd": crowd[keep],
            "image_id": record["image_id"],
            "height": record["height"],
            "width": record["width"],
        }

    def panoptic_ground_truth(self, index: int):
        """(image id, int32[H, W] segment ids, segments {id, category_id, iscrowd}) of record
        index, straight from its PNG (PanopticQuality's ground truth)."""
        record = self.records[index]
        try:
            ids = self._segment_ids(record, None)
        except UnusableExample as error:
            raise DataError(
                f"panoptic ground truth of image id {record['image_id']}: {error}"
            ) from error
        return record["image_id"], ids, [dict(s) for s in record["segments"]]
