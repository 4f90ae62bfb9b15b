"""mmdetection's SOLOv2 R50-FPN 1x schedule on COCO 2017 (configs/solov2/
solov2_r50_fpn_1x_coco.py), for GPU/TPU users (not run here).

    instseg-jax train --config experiments/solov2_r50_fpn_coco_1x.py --workdir runs/solov2_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Batch 16, lr 0.01, 12 epochs (90k steps at 7330 per epoch, rounded as Mask R-CNN's 1x) with
decays at epochs 8 and 11, 500 warmup steps, gradients clipped at global norm 35; FrozenBN ResNet-50 with the stem and res2 frozen
(mmdetection freezes the stem and stage 1 of an ImageNet ResNet-50: ImageNet weights through
--config.model.backbone_weights, the command above; from scratch use GroupNorm and a longer
schedule); single-scale
800 x 1333 input on the 1344 x 1344 canvas, each image's grids spanning the image padded to 32
pixels as the reference's (model.grid_extent; the module docstring of
instseg_jax/methods/solov2.py says what else the fixed canvas changes). mmdetection's configs/solov2/README.md and
WXinlong/SOLO's README report 34.8 mask AP for R50 1x on COCO val2017 (37.5 for R50 3x with
multi-scale training); this file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import solov2


def get_config(arg=None):
    c = solov2.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.short_side = (800,)
    c.model.grid_extent = "image"  # the default, the reference's: stated for the reader
    return common.accelerator_recipe(c, arg)
