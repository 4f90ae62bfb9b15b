"""Images in, detections and overlay PNGs out.

    instseg-jax predict --workdir DIR --images FILES_OR_DIRS --out OUT
    instseg-jax predict --checkpoint DIR/checkpoints/STEP --images ... --out OUT

Any image size: each image goes through the evaluation pipeline (resized to the test size and
padded into the model's canvas) and its detections are mapped back to its own pixels by the
same code as evaluation's. Per image: OUT/<name>.json (boxes xyxy, scores, class names,
RLE masks) and OUT/<name>.png (translucent masks, boxes, class and score labels). Files that
cannot be read are reported and skipped; the run goes on with the rest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from instseg_jax import builders, detections, evaluate
from instseg_jax.config import UserError
from instseg_jax.input.images import DataError, UnreadableImage, decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ],
    np.uint8,
)


def image_files(paths) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def overlay(image: np.ndarray, instances, class_names, skeleton=()) -> Image.Image:
    """RGB overlay of detections.image_instances: translucent coloured masks, box outlines,
    "name score" labels, and for keypoint detections the skeleton's lines (pairs of keypoint
    indices) and a dot per keypoint whose score is positive (a logit above 0)."""
    canvas = image.astype(np.float32)
    for i, instance in enumerate(instances):
        region = instance["region"]
        if region is None:
            continue
        top, left = instance["top"], instance["left"]
        window = canvas[top : top + region.shape[0], left : left + region.shape[1]]
        window[region] = 0.55 * window[region] + 0.45 * PALETTE[i % len(PALETTE)]
    picture = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i, instance in enumerate(instances):
        colour = tuple(int(v) for v in PALETTE[i % len(PALETTE)])
        box, label = instance["box"], f"{class_names[instance['class']]} {instance['score']:.2f}"
        draw.rectangle(box, outline=colour, width=1)
        draw.text((box[0] + 1, box[1] + 1), label, fill=colour)
        if "keypoints" in instance:
            points, shown = instance["keypoints"], instance["keypoint_scores"] > 0
            for a, b in skeleton:
                if shown[a] and shown[b]:
                    draw.line([tuple(points[a, :2]), tuple(points[b, :2])], fill=colour, width=1)
            for (x, y), visible in zip(points[:, :2], shown, strict=True):
                if visible:
                    draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour, outline="white")
    return picture


class ImageFiles:
    """A source of unannotated image files for the inference pipeline (image_id = position in
    the list); a file that cannot be read is UnreadableImage, which the pipeline counts and
    turns into a padding slot."""

    def __init__(self, files):
        self.files = [Path(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, counts=None) -> dict:
        del counts
        try:
            image = decode_image(self.files[index])
        except DataError as error:  # a missing file is as unreadable as a corrupt one here
            raise UnreadableImage(str(error)) from error
        h, w = image.shape[:2]
        return {
            "image": image,
            "masks": np.zeros((0, h, w), bool),
            "boxes": np.zeros((0, 4), np.float32),
            "classes": np.zeros(0, np.int32),
            "iscrowd": np.zeros(0, bool),
            "image_id": index,
        }


def predict(
    config, variables, images, out: str | Path, score_threshold: float = 0.5, class_names=None
) -> dict:
    """Detect on image files through the evaluation pipeline (same test size, same mapping to
    original pixels); returns the written files and the skipped ones."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = image_files(images)
    if not files:
        raise UserError(f"--images {' '.join(map(str, images))}: no image files found")
    paste_rule = builders.paste_rule(builders.model_config(config, len(class_names)))
    skeleton = ()
    if config.input.get("keypoints"):
        from instseg_jax.input.keypoints import keypoint_set

        skeleton = keypoint_set(config.input.keypoints).skeleton
    written, seen = 0, set()
    bar = tqdm(total=len(files), desc="predict", unit="img")
    for batch, found, _ in evaluate.run_inference(
        config, variables, ImageFiles(files), len(class_names), desc="device"
    ):
        for b, index in enumerate(batch["image_id"]):
            if index < 0 or not batch["example_valid"][b]:
                continue
            path = files[int(index)]
            seen.add(int(index))
            geometry = detections.ImageGeometry.of_batch(batch, b)
            instances = detections.image_instances(
                found, b, geometry, paste_rule, min_score=score_threshold
            )
            _write(path, out, geometry.orig_hw, instances, class_names, skeleton)
            written += 1
            bar.update(1)
    skipped = [str(f) for i, f in enumerate(files) if i not in seen]
    bar.update(len(skipped))
    bar.close()
    if skipped:
        log.warning("%d file(s) could not be read: %s", len(skipped), ", ".join(skipped))
    return {"written": written, "skipped": skipped}


def _write(path: Path, out: Path, hw, instances, class_names, skeleton=()) -> None:
    """OUT/<stem>.json and OUT/<stem>.png of one image's detections."""
    buffer = np.zeros(hw, np.uint8, order="F")
    records = []
    for instance in instances:
        rle = None
        if instance["region"] is not None:
            rle = detections.encode_region(
                instance["region"], instance["top"], instance["left"], buffer
            )
        record = {
            "box": instance["box"],
            "score": instance["score"],
            "class": class_names[instance["class"]],
            "mask": rle,
        }
        if "keypoints" in instance:
            record["keypoints"] = [[float(v) for v in p] for p in instance["keypoints"][:, :2]]
            record["keypoint_scores"] = [float(v) for v in instance["keypoint_scores"]]
        records.append(record)
    record = {"image": str(path), "height": int(hw[0]), "width": int(hw[1]), "detections": records}
    (out / f"{path.stem}.json").write_text(json.dumps(record))
    picture = overlay(decode_image(path), instances, class_names, skeleton)
    picture.save(out / f"{path.stem}.png")


def main(args) -> int:
    if args.checkpoint_path:
        path = Path(args.checkpoint_path)
        if not path.name.isdigit():
            raise UserError(f"--checkpoint {path}: expected DIR/checkpoints/STEP")
        workdir, step = path.parent.parent, int(path.name)
    elif args.workdir:
        workdir, step = Path(args.workdir), None
    else:
        raise UserError("give --workdir DIR or --checkpoint DIR/checkpoints/STEP")
    config, variables, step = evaluate.restore_variables(workdir, step)
    _, class_names = builders.workdir_class_map(workdir, config)
    result = predict(config, variables, args.images, args.out, args.score_threshold, class_names)
    print(f"wrote {result['written']} image(s) to {args.out}; skipped {len(result['skipped'])}")
    return 0
