"""A workdir's inference program as serialized StableHLO, for serving without this library.

    instseg-jax export --workdir DIR --out FILE [--batch N] [--checkpoint STEP]
        [--platforms cpu,cuda,tpu] [--config.model.score_threshold=0.3 ...]

FILE holds `jax.export`'s serialization of the model's one-program forward at test time: a dict
of preprocessed canvas-batch fields in (the fields the forward reads, N images deep), the
Detections dict out (boxes, scores, classes, valid and the method's mask payload; structures.py),
every shape static. FILE.json beside it says what to feed and what comes back: each input's
and output's shape, dtype and meaning, the test-time resize that makes the canvas, the class
map, the method, the checkpoint step, the jax version and the platforms. Load it with plain jax:

    exported = jax.export.deserialize(open(FILE, "rb").read())
    detections = exported.call({"image": canvas, "image_hw": ..., ...})

The weights are baked into the program as constants, not passed as an argument: the file is
then all a server needs (no tree of arrays to restore and flatten in the order the program
expects, no checkpoint reader), and XLA can fold what is computed from the weights alone
(frozen batch norm's scale and shift) when it compiles. The cost is one file per checkpoint and
the 2 GiB limit of jax.export's flatbuffer, far above the detectors here (a ResNet-50 Mask
R-CNN's 44 M parameters are ~170 MiB of float32). Runs that kept an EMA of their weights
export the average (workdir.restore_variables gives it, as evaluation uses it).

Methods that run inference as two programs on the host (Mask R-CNN's `make_inference`, which
picks a mask budget from the detections' count) export their one-program forward: the masks of
the valid slots are the same (tested in the method's tests), and a served program has no host
between its halves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from instseg_jax import builders
from instseg_jax import workdir as workdir_lib
from instseg_jax.config import UserError
from instseg_jax.input.pipeline import padding_example

# jax.export's platform names; "cuda" and "rocm" are GPUs.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

# What each Batch field means to someone feeding the exported program (structures.py's Batch,
# at test time: no crop and no flip).
INPUT_MEANINGS = {
    "image": "RGB canvas: the resized image at the top-left, pad_value elsewhere (preprocessing)",
    "image_hw": "(h, w) of the resized image on the canvas",
    "orig_hw": "(h, w) of the original image: boxes and masks come back in its pixels",
    "scale": "canvas pixels per original pixel: the resize's scale (preprocessing)",
    "scale_yx": "(sy, sx) canvas pixels per original pixel along each axis (both `scale` but "
    "for input.resize 'stretch')",
    "crop_offset": "(0, 0) at test time",
    "flipped": "False at test time",
    "example_valid": "True for an image, False for a padding slot of the batch",
}

OUTPUT_MEANINGS = {
    "boxes": "xyxy in original image pixels",
    "scores": "detection scores",
    "classes": "class index in [0, C): classes.category_ids / class_names",
    "valid": "a real detection (True) or a padding slot; valid slots come first",
    "masks": "box-relative mask probabilities, resampled bilinearly into each box at the "
    "original size and cut at mask_paste_threshold (mask_paste)",
    "canvas_masks": "mask probabilities on the canvas at stride canvas_h / H_s: undo the "
    "stride and the padding, then the resize; threshold at 0.5",
    "polygons": "(x, y) vertices in original image pixels",
    "keypoint_heatmaps": "logits of each keypoint over its detection's keypoint_boxes",
    "keypoint_boxes": "the canvas boxes the keypoint heatmaps cover",
    "keypoint_frame": "(rx, ry, shift): canvas-to-original scale per axis, shift added to "
    "decoded positions",
    "semantic_classes": "the semantic map's classes (Panoptic FPN's stuff branch)",
}


class _RecordingBatch(dict):
    """A batch dict that notes which fields are read (by [] or get) while a forward traces."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def _structs(example: dict, batch: int) -> dict:
    import jax

    return {
        k: jax.ShapeDtypeStruct((batch, *np.shape(v)), np.asarray(v).dtype)
        for k, v in example.items()
    }


def inference_program(config, variables, num_classes: int, batch: int):
    """(the jitted program {field: array} -> Detections with the variables baked in, the
    ShapeDtypeStructs of its input fields): the model's test-time forward on a batch of
    `batch` canvases, taking only the Batch fields that forward reads (found by tracing it
    once on every field of the test-time transform's example)."""
    import jax

    _, _, model = builders.build_model(config, num_classes)
    example = builders.device_fields(padding_example(builders.transform_config(config, False)))
    structs = _structs(example, batch)

    def forward(fields):
        return model.apply(variables, fields, train=False)["detections"]

    read: set[str] = set()

    def recorded_forward(all_fields):
        recording = _RecordingBatch(all_fields)
        out = forward(recording)
        read.update(recording.read)
        return out

    jax.eval_shape(recorded_forward, structs)
    fields = {k: structs[k] for k in example if k in read}
    return jax.jit(forward), fields


def parse_platforms(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PLATFORMS]
    if not names or unknown:
        raise UserError(
            f"--platforms {text}: give a comma-separated list of {', '.join(PLATFORMS)} "
            "(e.g. cpu,cuda,tpu)"
        )
    return names


def preprocessing(config) -> dict:
    """How an image becomes the canvas and the geometry fields (the test-time transform of
    input/transforms.py), in words and numbers a server can follow without this library."""
    t = builders.transform_config(config, False)
    torchvision = t.resize_rule == "torchvision"
    size = "floor" if torchvision else "round"
    out = {
        "canvas_hw": list(t.canvas_hw),
        "channels": "RGB, uint8 (grey images repeated to 3 channels, alpha dropped)",
        "short_side": int(t.short_side[0]),
        "max_long_side": int(t.max_long_side),
        "scale": "min(short_side / min(h, w), max_long_side / max(h, w), canvas_h / h, "
        "canvas_w / w), in float64 for an original image of h x w",
        "resize_rule": t.resize_rule,
        "resized_hw": f"({size}(h * scale), {size}(w * scale)), each at least 1",
        "resize": (
            "torch.nn.functional.interpolate(mode='bilinear', align_corners=False, "
            "antialias=False) of the float32 pixels, rounded and clipped to uint8"
            if torchvision
            else "PIL.Image.resize(..., Image.BILINEAR) of the uint8 image"
        ),
        "pad_value": [int(v) for v in t.pad_value],
        "layout": "the resized image at canvas[:resized_h, :resized_w], pad_value elsewhere",
        "normalisation": "inside the program: feed uint8 pixels, not mean/std-normalised ones",
        "padding_slots": "fill unused batch slots with any canvas and example_valid False",
    }
    if t.resize == "stretch":  # input.resize "stretch": a fixed size, aspect ratio not kept
        h, w = (int(v) for v in t.stretch_hw)
        del out["short_side"], out["max_long_side"]
        out["stretch_hw"] = [h, w]
        out["scale"] = f"scale_yx = ({h} / h, {w} / w) per axis; scale = sqrt(sy * sx)"
        out["resized_hw"] = f"({h}, {w})"
    return out


def describe(config, exported, step: int, class_map, platforms, workdir) -> dict:
    """The JSON beside the exported file (module docstring)."""
    import jax

    inputs_tree = exported.in_tree.unflatten(exported.in_avals)[0][0]
    outputs_tree = exported.out_tree.unflatten(exported.out_avals)

    def spec(aval, meaning):
        return {"shape": list(aval.shape), "dtype": str(aval.dtype), "meaning": meaning}

    model_cfg = builders.model_config(config, len(class_map[1]))
    paste = builders.mask_paste(model_cfg)
    return {
        "format": "jax.export serialized StableHLO: jax.export.deserialize(bytes).call(inputs)",
        "call": "exported.call({input name: array}) -> {output name: array}",
        "method": config.method,
        "workdir": str(workdir),
        "checkpoint_step": int(step),
        "jax_version": jax.__version__,
        "platforms": list(platforms),
        "weights": "baked into the program as constants",
        # Above 0: the run kept a moving average of its weights, and that average is baked in
        # (workdir.restore_variables gives it, as evaluation uses it).
        "ema_decay": float(config.optim.get("ema_decay", 0.0) or 0.0),
        "batch": int(exported.in_avals[0].shape[0]),
        "inputs": {
            k: spec(v, INPUT_MEANINGS.get(k, "see instseg_jax/structures.py, Batch"))
            for k, v in inputs_tree.items()
        },
        "outputs": {
            k: spec(v, OUTPUT_MEANINGS.get(k, "see instseg_jax/structures.py, Detections"))
            for k, v in outputs_tree.items()
        },
        "mask_paste": paste.rule,
        "mask_paste_threshold": paste.threshold,
        "score_threshold": config.model.get("score_threshold"),
        "preprocessing": preprocessing(config),
        "classes": {"category_ids": list(class_map[0]), "class_names": list(class_map[1])},
    }


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be written before anything is restored or traced."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out}/model.stablehlo")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"--out {out}: cannot create its folder {out.parent} ({error.strerror}); give a path "
            "in a folder you can write"
        ) from error
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(
            f"--out {out}: not writable; give a path in a folder you can write, or change the "
            "permissions"
        )


def export(
    workdir, out, batch: int = 1, step: int | None = None, platforms=("cpu",), overrides=()
) -> dict:
    """Write out (the serialized program) and out + ".json" (its description) for the
    checkpoint `step` (latest by default) of a workdir; returns the description."""
    import jax

    out = Path(out)
    if batch < 1:
        raise UserError(f"--batch {batch}: give the number of canvases per call, 1 or more")
    _check_out(out)
    config, variables, step = workdir_lib.restore_variables(workdir, step, overrides)
    class_map = workdir_lib.read_class_map(workdir, config)
    program, fields = inference_program(config, variables, len(class_map[1]), batch)
    exported = jax.export.export(program, platforms=tuple(platforms))(fields)
    out.write_bytes(exported.serialize())
    description = describe(config, exported, step, class_map, platforms, workdir)
    Path(f"{out}.json").write_text(json.dumps(description, indent=2) + "\n")
    return description


def main(args) -> int:
    platforms = parse_platforms(args.platforms)
    description = export(
        args.workdir, args.out, args.batch, args.checkpoint, platforms, args.overrides
    )
    size = Path(args.out).stat().st_size / 2**20
    print(
        f"wrote {args.out} ({size:.1f} MiB, {description['method']} at step "
        f"{description['checkpoint_step']}, batch {description['batch']}, "
        f"{'/'.join(platforms)}) and {args.out}.json"
    )
    return 0
