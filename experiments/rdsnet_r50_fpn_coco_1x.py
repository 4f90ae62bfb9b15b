"""wangsr126/RDSNet's R-50 (configs/rdsnet/rdsnet_r50_fpn_1x.py, with MBRM at test as
rdsnet_refine_r50_fpn_1x.py: the same weights) on COCO 2017, for GPU/TPU users (not run here).

    instseg-jax train --config experiments/rdsnet_r50_fpn_coco_1x.py --workdir runs/rdsnet \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth, the reference's
torchvision://resnet50), fetched once where there is internet (docs/getting_started.md,
"Pretrained backbones"); without it training refuses to start: a FrozenBN ResNet needs those
weights.

Batch 16 (2 per GPU on 8), SGD lr 0.005 (momentum 0.9, weight decay 1e-4), gradients clipped
at norm 35, 500 linear warmup steps from lr / 3, 12 epochs (7330 iterations each at batch 16;
the README's "90k") with decays at epochs 8 and 11; training and test at 1333 x 800 (one
scale), flip 0.5, on the 1408 x 1408 canvas (P7's stride 128 divides it); FrozenBN ResNet-50
with the stem and res2 frozen (frozen_stages=1); FPN P3..P7 with P6 from res5; the object
stream's towers of 4 GroupNorm convs; the pixel stream from P3..P5 at stride 4; masks crop 1.5x
in training and 1.2x at test, thresholded at 0.4; MBRM on the boxes at test
(instseg_jax/methods/rdsnet.py: what differs). The reference's README reports, for this
config, 32.1 mask AP on COCO minival and 32.6 on test-dev, box AP 36.8 (minival) without and
37.8 with MBRM; this file has not reproduced them.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import rdsnet


def get_config(arg=None):
    c = rdsnet.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    return common.accelerator_recipe(c, arg)
