"""What every method's Config and model share: the classes and canvas the data fixes, the ResNet
backbone's fields, the compute dtype and the check that the canvas divides into the model's
coarsest feature map; `build_backbone` makes the one ResNet every method puts under the name
"backbone" (the weight importers and the trainer's backbone loading read it there).

A method's Config subclasses `DetectorConfig`, redeclares the defaults it differs by (a
redeclared field keeps its place) and sets `COARSEST_LEVEL`; its `__post_init__` calls
super's first.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Self

import jax.numpy as jnp

from instseg_jax import config as config_lib
from instseg_jax.backbones.resnet import ResNet


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    num_classes: int
    canvas_hw: tuple[int, int] = (800, 800)
    depth: int = 50
    width: int = 64
    norm: str = "frozen_bn"
    freeze_at: int = 2
    stage_blocks: tuple = ()  # residual blocks per stage; () = those of `depth`
    compute_dtype: str = "float32"

    # The coarsest feature map the model reads and its stride: the canvas must divide into it
    # (a class attribute, not a config field).
    COARSEST_LEVEL: ClassVar[tuple[str, int]] = ("res5", 32)

    def __post_init__(self):
        level, stride = self.COARSEST_LEVEL
        if self.canvas_hw[0] % stride or self.canvas_hw[1] % stride:
            raise config_lib.ConfigValueError(
                f"input.canvas_hw {self.canvas_hw} must be divisible by {stride} ({level} has "
                f"stride {stride})"
            )

    @classmethod
    def from_config(cls, model_config, num_classes: int, canvas_hw) -> Self:
        return config_lib.method_config(cls, model_config, num_classes, canvas_hw)

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def deformable_layers(self) -> tuple[tuple, int]:
        """(dcn_layers, dcn_interval) of the ResNet (backbones/resnet.py deformable_blocks):
        no deformable convolution here; a Config with deformable fields (YOLACT++) returns
        them."""
        return (), 1


def build_backbone(cfg: DetectorConfig) -> ResNet:
    """The ResNet of cfg's backbone fields, in cfg's compute dtype."""
    dcn_layers, dcn_interval = cfg.deformable_layers()
    return ResNet(
        cfg.depth,
        cfg.width,
        cfg.norm,
        cfg.freeze_at,
        cfg.dtype,
        tuple(cfg.stage_blocks),
        tuple(dcn_layers),
        dcn_interval,
    )


def smoke_backbone(model_section, freeze_at: int | None = 1) -> None:
    """The smoke shrink's backbone, shared by every method's `smoke`: a ResNet-18 of width 16
    with GroupNorm (trains from scratch in seconds), the stem frozen unless `freeze_at` says
    otherwise (None: the method's own value)."""
    model_section.depth = 18
    model_section.width = 16
    model_section.norm = "group_norm"
    if freeze_at is not None:
        model_section.freeze_at = freeze_at


def loss_normaliser_group(images_per_group: int, batch_size: int) -> int:
    """model.loss_normaliser_images checked against the global batch it splits: the images per
    normaliser group (ops.group_normalizer_scale; 0: the whole batch). A batch no larger than
    one group is one group (fewer images than one reference GPU holds)."""
    if batch_size <= images_per_group:
        return 0
    if images_per_group and batch_size % images_per_group:
        raise config_lib.ConfigValueError(
            f"model.loss_normaliser_images {images_per_group} must divide the batch of "
            f"{batch_size} images (input.global_batch, or 0 for one group over the batch)"
        )
    return images_per_group
