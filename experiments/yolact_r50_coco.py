"""mmdetection's YOLACT R50 (configs/yolact/yolact_r50_1x8_coco.py) on COCO 2017, for GPU/TPU
users (not run here).

    instseg-jax train --config experiments/yolact_r50_coco.py --workdir runs/yolact \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Batch 8, SGD lr 1e-3 (weight decay 5e-4), 55 epochs with decays at epochs 20, 42, 49 and 52,
500 warmup steps from lr x 0.1; FrozenBN ResNet-50 with the stem frozen (ImageNet weights through
--config.model.backbone_weights, the command above; mmdetection trains its batch norms); images resized
aspect-preserving to a 550 px long side on a 640 x 640 canvas where the reference stretches
them to 550 x 550 (instseg_jax/methods/yolact.py says why), and without the reference's
expand, min-IoU crop and photometric augmentations. mmdetection reports 29.0 mask AP on COCO
val2017 for this config; dbolya/yolact 28.2 on test-dev at 42.5 FPS on a Titan Xp. This file
has not reproduced them.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import yolact


def get_config(arg=None):
    c = yolact.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    return common.accelerator_recipe(c, arg)
