"""AdelaiDet's CondInst MS_R_50_1x on COCO 2017 (configs/CondInst/MS_R_50_1x.yaml with its
Base-CondInst.yaml), for GPU/TPU users (not run here).

    instseg-jax train --config experiments/condinst_r50_fpn_coco_1x.py --workdir runs/ci_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

FCOS's R_50_1x detector and schedule (experiments/fcos_r50_fpn_coco_1x.py: batch 16, lr 0.01,
90k steps, multi-scale short side 640..800, 1408 x 1408 canvas, ImageNet weights through
--config.model.backbone_weights) plus the controller (169 dynamic parameters per location), the
mask branch from P3..P5 (4 convs x 128, 8 output channels at stride 8) and dice loss on at most
250 positive locations per image (the reference's 500 per GPU of 2 images). AdelaiDet's README
reports 35.9 mask AP on COCO val2017 for MS_R_50_1x (mmdetection's condinst_r50_fpn_ms-poly-
90k: 30.8 with its own settings); this file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import condinst


def get_config(arg=None):
    c = condinst.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    return common.accelerator_recipe(c, arg)
