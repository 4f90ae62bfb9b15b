"""Images in, detections and overlay PNGs out.

    instseg-jax predict --workdir DIR --images FILES_OR_DIRS --out OUT
    instseg-jax predict --checkpoint DIR/checkpoints/STEP --images ... --out OUT

Any image size: each image is resized and padded into the model's canvas and the detections
are mapped back to its own pixels. Per image: OUT/<name>.json (boxes xyxy, scores, class names,
RLE masks) and OUT/<name>.png (translucent masks, boxes, class and score labels). Files that
cannot be read are reported and skipped; the run goes on with the rest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from instseg_jax import evaluate
from instseg_jax import train as train_lib
from instseg_jax.input import report
from instseg_jax.input.images import DataError, decode_image
from instseg_jax.input.pipeline import padding_example, stack_examples
from instseg_jax.input.transforms import transform

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


def overlay(image: np.ndarray, boxes, scores, names, masks) -> Image.Image:
    """RGB overlay: translucent coloured masks, box outlines, "name score" labels."""
    canvas = image.astype(np.float32)
    for i, mask in enumerate(masks):
        colour = PALETTE[i % len(PALETTE)]
        canvas[mask] = 0.55 * canvas[mask] + 0.45 * colour
    picture = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i, (box, score, name) in enumerate(zip(boxes, scores, names, strict=True)):
        colour = tuple(int(v) for v in PALETTE[i % len(PALETTE)])
        draw.rectangle([float(v) for v in box], outline=colour, width=1)
        draw.text((float(box[0]) + 1, float(box[1]) + 1), f"{name} {score:.2f}", fill=colour)
    return picture


def predict(
    config, variables, images, out: str | Path, score_threshold: float = 0.5, class_names=None
) -> dict:
    """Detect on image files; returns counts of written and skipped files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tconfig = train_lib.transform_config(config, train=False)
    num_classes = len(class_names)
    cfg = train_lib.model_config(config, num_classes)
    model = train_lib.mask_rcnn.MaskRCNN(cfg)
    infer = jax.jit(lambda v, b: model.apply(v, b, train=False)["detections"])
    files = image_files(images)
    batch_size = config.eval.global_batch
    written, skipped = 0, []
    bar = tqdm(total=len(files), desc="predict", unit="img")
    for start in range(0, len(files), batch_size):
        chunk, examples, originals = [], [], []
        for path in files[start : start + batch_size]:
            try:
                image = decode_image(path)
            except (DataError, OSError) as error:
                log.warning("skipped %s: %s", path, error)
                skipped.append(str(path))
                bar.update(1)
                continue
            h, w = image.shape[:2]
            decoded = {
                "image": image,
                "masks": np.zeros((0, h, w), bool),
                "boxes": np.zeros((0, 4), np.float32),
                "classes": np.zeros(0, np.int32),
                "iscrowd": np.zeros(0, bool),
                "image_id": len(chunk),
            }
            examples.append(
                transform(decoded, tconfig, np.random.default_rng(0), report.new_counts())
            )
            chunk.append(path)
            originals.append(image)
        if not chunk:
            continue
        while len(examples) < batch_size:  # static batch: pad with ignored examples
            examples.append(padding_example(tconfig))
        batch = train_lib.device_fields(stack_examples(examples))
        detections = jax.device_get(infer(variables, batch))
        for b, path in enumerate(chunk):
            keep = np.flatnonzero(
                detections["valid"][b] & (detections["scores"][b] >= score_threshold)
            )
            boxes = detections["boxes"][b][keep]
            hw = originals[b].shape[:2]
            if "masks" in detections:
                masks, rles = evaluate.paste_and_encode(
                    detections["masks"][b][keep], boxes, hw, cfg.mask_paste
                )
            else:  # Faster R-CNN: boxes only
                masks, rles = np.zeros((0, *hw), bool), [None] * len(keep)
            names = [class_names[c] for c in detections["classes"][b][keep]]
            scores = detections["scores"][b][keep]
            record = {
                "image": str(path),
                "height": int(hw[0]),
                "width": int(hw[1]),
                "detections": [
                    {
                        "box": [float(v) for v in boxes[i]],
                        "score": float(scores[i]),
                        "class": names[i],
                        "mask": rles[i],
                    }
                    for i in range(len(keep))
                ],
            }
            (out / f"{path.stem}.json").write_text(json.dumps(record))
            overlay(originals[b], boxes, scores, names, masks).save(out / f"{path.stem}.png")
            written += 1
            bar.update(1)
    bar.close()
    if skipped:
        log.warning("%d file(s) could not be read: %s", len(skipped), ", ".join(skipped))
    return {"written": written, "skipped": skipped}


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.checkpoint_path:
        path = Path(args.checkpoint_path)
        workdir, step = path.parent.parent, int(path.name)
    elif args.workdir:
        workdir, step = Path(args.workdir), None
    else:
        raise SystemExit("give --workdir DIR or --checkpoint DIR/checkpoints/STEP")
    config, variables, step = evaluate.restore_variables(workdir, step)
    # An imported model carries its class names; a trained one takes its data's.
    source = (
        None if config.input.get("category_ids") else train_lib.build_source(config.input, False)
    )
    _, class_names = train_lib.class_map(config, source)
    result = predict(config, variables, args.images, args.out, args.score_threshold, class_names)
    print(f"wrote {result['written']} image(s) to {args.out}; skipped {len(result['skipped'])}")
    return 0
