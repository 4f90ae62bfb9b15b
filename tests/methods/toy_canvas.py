"""A minimal second method, defined only in the test suite: per-class masks on the canvas at
stride 4 from a few convolutions. It proves that a method arrives as one module and runs
through `instseg-jax train | eval | predict` without any file of the package naming it
(config.method = "tests.methods.toy_canvas").

Each class is one detection per image: its canvas mask is the class's sigmoid map, its score
the mean probability over the pixels above 0.5, and its box comes from the mask (the host
derives it). Training: per-pixel binary cross-entropy against the union of the class's
instances at stride 4, inside the valid region.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import structures
from instseg_jax.configs import common

STRIDE = 4
INPUTS = structures.Inputs(full_mask_stride=STRIDE)


@dataclasses.dataclass(frozen=True)
class Config:
    num_classes: int
    canvas_hw: tuple[int, int] = (128, 128)
    width: int = 16
    score_threshold: float = 0.05

    @classmethod
    def from_config(cls, model_config, num_classes: int, canvas_hw) -> Config:
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_classes", "canvas_hw"}
        unknown = set(dict(model_config)) - fields
        if unknown:
            raise config_lib.ConfigValueError(
                f"unknown model config fields {sorted(unknown)}; known: {sorted(fields)}"
            )
        return cls(num_classes=num_classes, canvas_hw=tuple(canvas_hw), **dict(model_config))


class Model(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, batch: dict, train: bool, key: jax.Array | None = None) -> dict:
        del key  # nothing is sampled
        cfg = self.cfg
        x = batch["image"].astype(jnp.float32) / 255.0 - 0.5
        x = nn.relu(nn.Conv(cfg.width, (3, 3), strides=2)(x))  # [B, H/2, W/2, D]
        x = nn.relu(nn.Conv(cfg.width, (3, 3), strides=2)(x))  # [B, H/4, W/4, D]
        x = nn.relu(nn.Conv(cfg.width, (3, 3))(x))
        logits = nn.Conv(cfg.num_classes, (1, 1))(x)  # [B, H/4, W/4, C]
        outputs = {"logits": logits}
        if not train:
            outputs["detections"] = detect(logits, batch, cfg)
        return outputs


def _valid_cells(image_hw, shape):
    """bool[B, h, w]: stride-4 cells whose centres lie in the valid region."""
    h, w = shape
    ys = (jnp.arange(h) + 0.5) * STRIDE
    xs = (jnp.arange(w) + 0.5) * STRIDE
    return (ys[None, :, None] < image_hw[:, 0, None, None]) & (
        xs[None, None, :] < image_hw[:, 1, None, None]
    )


def detect(logits, batch, cfg: Config) -> dict:
    probs = jax.nn.sigmoid(logits) * _valid_cells(batch["image_hw"], logits.shape[1:3])[..., None]
    masks = jnp.moveaxis(probs, -1, 1)  # [B, C, h, w]: one detection slot per class
    above = masks >= 0.5
    area = above.sum(axis=(2, 3))
    scores = jnp.where(area > 0, (masks * above).sum(axis=(2, 3)) / jnp.maximum(area, 1), 0.0)
    b, c = scores.shape
    return {
        "scores": scores,
        "classes": jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c)),
        "valid": scores > cfg.score_threshold,
        "canvas_masks": masks,
    }


def loss_fn(outputs: dict, batch: dict, cfg: Config):
    logits = outputs["logits"]  # [B, h, w, C]
    classes = jax.nn.one_hot(batch["gt_classes"], cfg.num_classes) * batch["gt_valid"][..., None]
    target = jnp.einsum("bnhw,bnc->bhwc", batch["gt_full_masks"].astype(jnp.float32), classes)
    target = jnp.minimum(target, 1.0)
    weight = _valid_cells(batch["image_hw"], logits.shape[1:3])[..., None].astype(jnp.float32)
    per_cell = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    loss = (per_cell * weight).sum() / jnp.maximum(weight.sum() * cfg.num_classes, 1.0)
    return loss, {"loss_mask": loss}


def base_config() -> ml_collections.ConfigDict:
    c = config_lib.base()
    c.method = __name__
    c.model = ml_collections.ConfigDict({"width": 16, "score_threshold": 0.05})
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = config_lib.smoke_common(c)
    c.optim.name = "adamw"
    c.optim.lr = 0.01
    return c


def get_config(arg=None):
    """Experiment entry point: `--config tests/methods/toy_canvas.py:smoke`."""
    c = base_config()
    c.method = (
        "tests.methods.toy_canvas"  # the importable path (this file may load as another name)
    )
    return common.finish(c, arg)
