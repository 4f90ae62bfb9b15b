"""The authors' PANet R-50-FPN 2x mask recipe on COCO 2017 (ShuLiu1993/PANet,
configs/panet/e2e_panet_R-50-FPN_2x_mask.yaml), for GPU/TPU users (not run here).

    instseg-jax train --config experiments/panet_r50_fpn_coco_2x.py --workdir runs/panet_2x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

PANet's defaults (methods/panet.py: bottom-up path with GroupNorm, adaptive feature pooling, the
"4conv1fc" GroupNorm box head, a 4-conv GroupNorm mask head with fully-connected fusion) on Mask
R-CNN R50-FPN; the authors' schedule: batch 16, lr 0.02, 180k steps with decays at 120k and 160k,
500 warmup steps from lr / 3, biases at twice the lr without weight decay, multi-scale training on
short sides 400..1200 (1200 listed twice, as theirs) with the long side at most 1400 on a 1408 x
1408 canvas, testing at 1000 / 1400. Their README reports 43.1 box AP / 38.3 mask AP on COCO val
for this recipe (the paper: 42.1 / 37.8); this file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import panet


def get_config(arg=None):
    c = panet.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.short_side = (1200, 1200, 1000, 800, 600, 400)
    c.input.max_long_side = 1400
    c.input.test_short_side = 1000
    c.input.test_max_long_side = 1400
    c.input.canvas_hw = (1408, 1408)
    c.schedule.total_steps = 180000
    c.schedule.steps = (120000, 160000)
    c.schedule.warmup_steps = 500
    c.schedule.warmup_factor = 1.0 / 3.0
    # SOLVER.BIAS_DOUBLE_LR, BIAS_WEIGHT_DECAY False (lib/core/config.py, applied in
    # tools/train_net_step.py); the GroupNorms' biases differ: methods/panet.py docstring.
    c.optim.bias_lr_multiplier = 2.0
    c.optim.bias_weight_decay_multiplier = 0.0
    # Every sampled positive trains the mask head (up to 512 x 0.25), as in the reference.
    c.model.mask_fg_per_image = 128
    # The reference rasterises COCO's polygons inside each RoI at 28 x 28
    # (PANet's lib/utils/segms.py polys_to_mask_wrt_box); from the box crop
    # the closest rule is the adaptive one (experiments/parity/mask_target_rules.py).
    c.model.mask_target_sampling_ratio = 0
    return common.accelerator_recipe(c, arg)
