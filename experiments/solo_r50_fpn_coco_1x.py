"""mmdetection 3.x's SOLO R50-FPN 1x schedule on COCO 2017 (configs/solo/solo_r50_fpn_1x_coco.py),
for GPU/TPU users (not run here); experiments/solo_decoupled_r50_fpn_coco_1x.py is Decoupled
SOLO's.

    instseg-jax train --config experiments/solo_r50_fpn_coco_1x.py --workdir runs/solo_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Batch 16, lr 0.01, 12 epochs (90k steps at 7330 per epoch, rounded as Mask R-CNN's 1x) with
decays at epochs 8 and 11, 500 warmup steps from lr x 0.001, no gradient clipping (mmdetection's
_base_/schedules/schedule_1x.py under the file's lr 0.01; WXinlong/SOLO's
solo_r50_fpn_8gpu_1x.py instead warms up from lr / 3, decays at epochs 9 and 11 and clips at
norm 35); FrozenBN ResNet-50 with the stem and res2 frozen; category and mask towers of 7 convs
x 256 channels, grids (40, 36, 24, 16, 12), sigma 0.2, dice weight 3; single-scale 800 x 1333
input on the 1344 x 1344 canvas, each image's grids spanning the image padded to 32 pixels
(model.grid_extent; instseg_jax/methods/solov2.py's module docstring says what else the fixed
canvas changes). mmdetection's configs/solo/metafile.yml reports 33.1 mask AP for this setting
on COCO val2017 (WXinlong/SOLO's README: 32.9, SOLO_R50_1x); this file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import solo


def get_config(arg=None):
    c = solo.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.short_side = (800,)
    c.model.grid_extent = "image"  # the default, the reference's: stated for the reader
    c.model.mask_branch = "vanilla"  # the default: experiments/solo_decoupled_... sets the other
    return common.accelerator_recipe(c, arg)
