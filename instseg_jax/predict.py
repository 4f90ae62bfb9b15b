"""Images in, detections and overlay PNGs out.

    instseg-jax predict --workdir DIR --images FILES_OR_DIRS --out OUT
    instseg-jax predict --checkpoint DIR/checkpoints/STEP --images ... --out OUT

Any image size: each image goes through the evaluation pipeline (resized to the test size and
padded into the model's canvas) and its detections are mapped back to its own pixels by the
same code as evaluation's. Per image: OUT/<name>.json (boxes xyxy, scores, class names,
RLE masks) and OUT/<name>.png (translucent masks, boxes, class and score labels). Panoptic
models (Panoptic FPN) write their panoptic map instead of thresholded detections: the things
that won their pixels (combination at model.combine_score), the stuff segments tinted and
named, and OUT/<name>_panoptic.png in COCO's panoptic PNG encoding. Files that cannot be read
are reported and skipped; the run goes on with the rest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from instseg_jax import builders, detections, inference
from instseg_jax import workdir as workdir_lib
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
STUFF_PALETTE = np.array(
    [[120, 120, 160], [120, 160, 120], [160, 130, 100], [110, 150, 160], [150, 110, 140]],
    np.uint8,
)


def image_files(paths) -> list[Path]:
    """The image files of --images: files as given, folders' image files in name order; a path
    that does not exist is a UserError (a misspelt name would otherwise write nothing)."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"--images {path}: no such file or folder")
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def overlay(image: np.ndarray, instances, class_names, skeleton=(), stuff=()) -> Image.Image:
    """RGB overlay of detections.image_instances: translucent coloured masks, box outlines,
    "name score" labels, and for keypoint detections the skeleton's lines (pairs of keypoint
    indices) and a dot per keypoint whose score is positive (a logit above 0). stuff: the
    panoptic map's stuff segments as (bool[H, W] mask, name), tinted in muted colours under
    the things and labelled at their middle pixel."""
    canvas = image.astype(np.float32)
    for i, (mask, _) in enumerate(stuff):
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * STUFF_PALETTE[i % len(STUFF_PALETTE)]
    for i, instance in enumerate(instances):
        region = instance["region"]
        if region is None:
            continue
        top, left = instance["top"], instance["left"]
        window = canvas[top : top + region.shape[0], left : left + region.shape[1]]
        window[region] = 0.55 * window[region] + 0.45 * PALETTE[i % len(PALETTE)]
    picture = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for mask, name in stuff:
        rows, cols = np.nonzero(mask)
        middle = len(rows) // 2  # a pixel of the segment, in row-major order
        draw.text((int(cols[middle]), int(rows[middle])), name, fill="white")
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
    config,
    variables,
    images,
    out: str | Path,
    score_threshold: float = 0.5,
    class_names=None,
    class_map=None,
    stuff_map=((), ()),
) -> dict:
    """Detect on image files through the evaluation pipeline (same test size, same mapping to
    original pixels); returns the written files and the skipped ones. class_map: (category
    ids, names) of the things; stuff_map: of the stuff classes, for models that predict a
    panoptic map (Panoptic FPN), whose outputs are its combination (module docstring)."""
    if class_map is not None:
        class_names = class_map[1]
    files = image_files(images)
    if not files:
        raise UserError(f"--images {' '.join(map(str, images))}: no image files found")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the JSON and PNG files")
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = builders.model_config(config, len(class_names))
    paste = builders.mask_paste(model_cfg)
    skeleton = ()
    if config.input.get("keypoints"):
        from instseg_jax.input.keypoints import keypoint_set

        skeleton = keypoint_set(config.input.keypoints).skeleton
    written, seen = 0, set()
    bar = tqdm(total=len(files), desc="predict", unit="img")
    for batch, found, _ in inference.run_inference(
        config, variables, ImageFiles(files), len(class_names), desc="device"
    ):
        for b, index, geometry in detections.batch_examples(batch):
            path = files[index]
            seen.add(index)
            panoptic_map = None
            if "semantic_classes" in found:  # its own threshold: model.combine_score
                instances, panoptic_map = _panoptic(
                    found, b, geometry, paste, model_cfg, class_map, stuff_map
                )
            else:
                instances = detections.image_instances(
                    found, b, geometry, paste, min_score=score_threshold
                )
            _write(path, out, geometry.orig_hw, instances, class_names, skeleton, panoptic_map)
            written += 1
            bar.update(1)
    skipped = [str(f) for i, f in enumerate(files) if i not in seen]
    bar.update(len(skipped))
    bar.close()
    if skipped and not written:  # each file's reason was logged as it was skipped
        raise UserError(
            f"--images: none of the {len(files)} image file(s) could be read "
            f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})"
        )
    if skipped:
        log.warning("%d file(s) could not be read: %s", len(skipped), ", ".join(skipped))
    return {"written": written, "skipped": skipped}


def _panoptic(found, b, geometry, paste, cfg, class_map, stuff_map):
    """(the things of image b's panoptic map, each with its region cut to its segment, and the
    map: (ids, segments with category names, stuff names))."""
    from instseg_jax import panoptic

    if class_map is None or not stuff_map[0]:
        raise UserError(
            "the model predicts a panoptic map but the workdir's classes.json names no stuff "
            "classes (stuff_category_ids, stuff_names); it was written before panoptic "
            "training: add them to classes.json"
        )
    instances = detections.image_instances(found, b, geometry, paste, min_score=cfg.combine_score)
    ids, segments = panoptic.predicted_map(
        instances, found["semantic_classes"][b], geometry, class_map[0], stuff_map[0], cfg
    )
    stuff_name = dict(zip(stuff_map[0], stuff_map[1], strict=True))
    areas = np.bincount(ids.ravel(), minlength=len(segments) + 1)
    things = []
    for segment in segments:
        segment["area"] = int(areas[segment["id"]])
        if segment["isthing"]:
            instance = dict(instances[segment["instance_index"]])
            region = instance["region"]
            top, left = instance["top"], instance["left"]
            window = ids[top : top + region.shape[0], left : left + region.shape[1]]
            instance["region"] = region & (window == segment["id"])
            things.append(instance)
            segment["category"] = class_map[1][instance["class"]]
        else:
            segment["category"] = stuff_name[segment["category_id"]]
        segment.pop("instance_index", None)
    return things, (ids, segments)


def _write(
    path: Path, out: Path, hw, instances, class_names, skeleton=(), panoptic_map=None
) -> None:
    """OUT/<stem>.json and OUT/<stem>.png of one image's detections; with a panoptic map also
    OUT/<stem>_panoptic.png, its segment ids in COCO's panoptic PNG encoding, and the JSON's
    "panoptic_segments": per segment its id, category_id, category (name), isthing, area
    (pixels) and, for things, score."""
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
    stuff = []
    if panoptic_map is not None:
        from instseg_jax.input.coco_panoptic import id_to_rgb

        ids, segments = panoptic_map
        Image.fromarray(id_to_rgb(ids)).save(out / f"{path.stem}_panoptic.png")
        record["panoptic_png"] = f"{path.stem}_panoptic.png"
        record["panoptic_segments"] = segments
        stuff = [(ids == s["id"], s["category"]) for s in segments if not s["isthing"]]
    (out / f"{path.stem}.json").write_text(json.dumps(record))
    picture = overlay(decode_image(path), instances, class_names, skeleton, stuff)
    picture.save(out / f"{path.stem}.png")


def lower_model_threshold(config, score_threshold: float) -> None:
    """Lower the model's own score threshold (model.score_threshold, where the method has one)
    to a --score-threshold below it: the model would drop those detections before predict
    sees them."""
    model_threshold = config.model.get("score_threshold")
    if model_threshold is None or score_threshold >= model_threshold:
        return
    config.model.score_threshold = float(score_threshold)
    log.info(
        "model.score_threshold lowered from %g to %g for --score-threshold",
        model_threshold,
        score_threshold,
    )


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
    config, variables, step = workdir_lib.restore_variables(
        workdir, step, getattr(args, "overrides", ())
    )
    lower_model_threshold(config, args.score_threshold)
    class_map = workdir_lib.read_class_map(workdir, config)
    result = predict(
        config,
        variables,
        args.images,
        args.out,
        args.score_threshold,
        class_map=class_map,
        stuff_map=workdir_lib.read_stuff_map(workdir),
    )
    print(f"wrote {result['written']} image(s) to {args.out}; skipped {len(result['skipped'])}")
    return 0
