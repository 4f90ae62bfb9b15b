"""mmdetection 3.x's Decoupled SOLO R50-FPN 1x schedule on COCO 2017
(configs/solo/decoupled-solo_r50_fpn_1x_coco.py over solo_r50_fpn_1x_coco.py), for GPU/TPU
users (not run here): experiments/solo_r50_fpn_coco_1x.py with model.mask_branch "decoupled".

    instseg-jax train --config experiments/solo_decoupled_r50_fpn_coco_1x.py \
        --workdir runs/solo_decoupled_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

The weights (torchvision's ImageNet ResNet-50) and every setting are SOLO's: its docstring says
where the weights come from and why training refuses to start without them.
mmdetection's configs/solo/metafile.yml reports 33.9 mask AP for this setting on COCO val2017
(WXinlong/SOLO's README: 33.9, Decoupled_SOLO_R50_1x); this file has not reproduced it.
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
    c.model.mask_branch = "decoupled"
    return common.accelerator_recipe(c, arg)
