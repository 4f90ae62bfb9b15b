"""detectron2's Mask R-CNN R50-FPN 1x schedule on COCO 2017, for GPU/TPU users (not run here).

    instseg-jax train --config experiments/maskrcnn_r50_fpn_coco_1x.py --workdir runs/coco_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Batch 16, lr 0.02, 90k steps with decays at 60k and 80k, 1000 warmup steps, FrozenBN ResNet-50
with the stem and res2 frozen, from ImageNet weights (the command above; from scratch: the
`:scratch` variant below). detectron2's model zoo reports
38.6 box AP / 35.2 mask AP for this recipe (MODEL_ZOO.md, mask_rcnn_R_50_FPN_1x, COCO val2017;
torchvision's maskrcnn_resnet50_fpn COCO_V1 weights: 37.9 / 34.6); this file has not
reproduced it yet.
`:scratch` trains from random weights instead, after detectron2's from-scratch recipe
(configs/Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml): GroupNorm ResNet-50, nothing frozen, the
3x schedule, no --config.model.backbone_weights; unlike that recipe the FPN and the heads stay
as in the 1x recipe (no GroupNorm, 2fc box head), so its published figures do not apply.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import mask_rcnn


def get_config(arg=None):
    c = mask_rcnn.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    # The published recipe trains the mask head on every sampled positive (up to 512 x 0.25),
    # what the default (model.mask_fg_per_image = 0) chooses; written out for the compile tool.
    c.model.mask_fg_per_image = 128
    # detectron2's POOLER_SAMPLING_RATIO 0 (defaults.py, box and mask poolers):
    # adaptive RoIAlign, ceil(RoI side / pool size) samples per bin axis, exact up to RoI sides
    # of model.adaptive_sampling_max_side (42) cells of their level (ops/roi_align.py).
    c.model.sampling_ratio = 0
    # The reference rasterises COCO's polygons inside each RoI at 28 x 28
    # (detectron2's default INPUT.MASK_FORMAT "polygon"); from the box crop
    # the closest rule is the adaptive one (experiments/parity/mask_target_rules.py).
    c.model.mask_target_sampling_ratio = 0
    if arg == "scratch":
        # detectron2's configs/Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml: no ImageNet
        # weights, GroupNorm, nothing frozen, the 3x schedule (270k steps, decays at 210k and
        # 250k). Its FPN and heads are GroupNorm too (a 4conv1fc box head); ours keep the 1x
        # recipe's unnormalised FPN and 2fc box head.
        c.model.norm = "group_norm"
        c.model.freeze_at = 0
        c.schedule.total_steps = 270_000
        c.schedule.steps = (210_000, 250_000)
        arg = None
    return common.accelerator_recipe(c, arg)
