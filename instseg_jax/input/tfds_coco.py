"""A tensorflow-datasets builder that stores any COCO instances set as array_record shards.

    source = TfdsCocoSource.build(name="nuclei", splits={"val": (json_path, image_dir)},
                                  data_dir=DIR)

writes DIR/coco_instances/nuclei/1.0.0/ with one example per image: the encoded image file as
it was (no re-encoding), its size and ids, and per instance the xyxy box, contiguous class,
crowd flag, annotation id and compressed RLE mask (polygons and uncompressed RLE are converted
with pycocotools, which is lossless at the image's resolution). Reading goes through
``tfds.data_source``: random access, NumPy only, TensorFlow not needed.

For COCO 2017, place the official files as data/README.md describes and name
``{"train": (.../instances_train2017.json, .../train2017), "val": (...)}``.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

from instseg_jax.input import report
from instseg_jax.input.coco import (
    CategoryIds,
    CocoSource,
    check_image_size,
    decode_instances,
    decode_segmentation,
)
from instseg_jax.input.images import DataError, UnreadableImage, decode_image


@dataclasses.dataclass
class CocoInstancesConfig(tfds.core.BuilderConfig):
    """name: the dataset's name; splits: split -> (annotation JSON, image folder)."""

    splits: dict = dataclasses.field(default_factory=dict)
    class_names: tuple = ()
    category_ids: tuple = ()


class CocoInstances(tfds.core.GeneratorBasedBuilder):
    """COCO-format instance segmentation, one example per image."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: ClassVar[list] = []  # configs are made per dataset: TfdsCocoSource.build

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="COCO instances with RLE masks",
            features=tfds.features.FeaturesDict(
                {
                    "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "file_name": tfds.features.Text(),
                    "image_id": np.int64,
                    "height": np.int32,
                    "width": np.int32,
                    "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                    "classes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "iscrowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                    "ann_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                    "rle_counts": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
            metadata=tfds.core.MetadataDict(
                class_names=list(self.builder_config.class_names),
                category_ids=list(self.builder_config.category_ids),
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # files are local; nothing is downloaded
        return {
            split: self._generate_examples(Path(ann), Path(images))
            for split, (ann, images) in self.builder_config.splits.items()
        }

    def _generate_examples(self, annotation_file: Path, image_dir: Path):
        source = CocoSource(annotation_file, image_dir, keep_empty=True)
        for record in source.records:
            rles = []
            for segmentation, ann_id in zip(
                record["segmentations"], record["ann_ids"], strict=True
            ):
                if segmentation is None:
                    rles.append("")
                    continue
                try:
                    mask = decode_segmentation(segmentation, record["height"], record["width"])
                except DataError as error:
                    raise DataError(
                        f"{annotation_file}: annotation id {int(ann_id)} of {record['path']}: "
                        f"{error}"
                    ) from error
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                rles.append(rle["counts"].decode("ascii"))
            yield (
                record["image_id"],
                {
                    "image_bytes": Path(record["path"]).read_bytes(),
                    "file_name": Path(record["path"]).name,
                    "image_id": record["image_id"],
                    "height": record["height"],
                    "width": record["width"],
                    "boxes": record["boxes"].reshape(-1, 4),
                    "classes": record["classes"],
                    "iscrowd": record["iscrowd"],
                    "ann_ids": record["ann_ids"],
                    "rle_counts": rles,
                },
            )


class TfdsCocoSource(CategoryIds):
    """Random-access source over a built split, with the same load() as CocoSource."""

    def __init__(self, name: str, split: str, data_dir: str | Path):
        self.data_source = tfds.data_source(
            f"coco_instances/{name}", split=split, data_dir=str(data_dir)
        )
        metadata = self.data_source.dataset_info.metadata
        self.class_names = list(metadata["class_names"])
        self.category_ids = list(metadata["category_ids"])

    @classmethod
    def build(cls, name: str, splits: dict, data_dir: str | Path, read_split: str | None = None):
        """Write the array_record shards of ``splits`` (skipped when already built)."""
        first = CocoSource(*next(iter(splits.values())), check_files=False)
        config = CocoInstancesConfig(
            name=name,
            splits={k: (str(a), str(i)) for k, (a, i) in splits.items()},
            class_names=tuple(first.class_names),
            category_ids=tuple(first.category_ids),
        )
        builder = CocoInstances(config=config, data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare()
        return cls(name, read_split or next(iter(splits)), data_dir)

    def __len__(self) -> int:
        return len(self.data_source)

    def image_categories(self) -> list[np.ndarray]:
        """Class indices of every example's non-crowd annotations (repeat-factor sampling):
        each record is read, no image decoded."""
        categories = []
        for index in range(len(self.data_source)):
            example = self.data_source[index]
            crowd = np.asarray(example["iscrowd"], bool)
            categories.append(np.asarray(example["classes"], np.int64)[~crowd])
        return categories

    def load(self, index: int, counts: np.ndarray | None = None) -> dict:
        counts = report.new_counts() if counts is None else counts
        example = self.data_source[index]
        height, width = int(example["height"]), int(example["width"])
        try:
            image = decode_image(io.BytesIO(example["image_bytes"]))
        except UnreadableImage as error:
            raise UnreadableImage(
                f"{example['file_name']} (tfds example {index}): {error}"
            ) from error
        check_image_size(
            image.shape[:2], (height, width), example["file_name"], f"tfds example {index}"
        )
        rles = [
            {"size": [height, width], "counts": c} if c else None
            for c in _as_strings(example["rle_counts"])
        ]
        instances = decode_instances(
            rles,
            example["boxes"],
            height,
            width,
            counts,
            ann_ids=example["ann_ids"],
            where=f"{example['file_name']} (tfds example {index})",
        )
        keep = instances.pop("keep")
        return {
            "image": image,
            **instances,
            "classes": np.asarray(example["classes"], np.int32)[keep],
            "iscrowd": np.asarray(example["iscrowd"], bool)[keep],
            "image_id": int(example["image_id"]),
        }


def _as_strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


__all__ = ["CocoInstances", "CocoInstancesConfig", "TfdsCocoSource"]
