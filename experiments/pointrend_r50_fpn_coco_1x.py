"""detectron2's PointRend R50-FPN 1x on COCO 2017 (projects/PointRend,
pointrend_rcnn_R_50_FPN_1x_coco.yaml over Base-PointRend-RCNN-FPN.yaml), for GPU/TPU users
(not run here).

    instseg-jax train --config experiments/pointrend_r50_fpn_coco_1x.py --workdir runs/pr_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Mask R-CNN R50-FPN 1x's detector and schedule (experiments/maskrcnn_r50_fpn_coco_1x.py: batch
16, lr 0.02, 90k steps, decays at 60k and 80k) with PointRend's mask head at the reference's
settings (the defaults of methods/pointrend.py): a coarse 7x7 head on 14x14 P2 features, a
3 x FC-256 point head, 196 training points per RoI on predicted boxes (oversampling 3,
importance 0.75), 224x224 masks by 3 subdivision steps of 784 points. detectron2's PointRend
README reports 36.2 mask AP on COCO val2017 (39.7 AP* against LVIS annotations) for this
recipe; this file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import pointrend


def get_config(arg=None):
    c = pointrend.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    # Every sampled positive trains the mask head (up to 512 x 0.25), as in the reference.
    c.model.mask_fg_per_image = 128
    # Point labels read each mask's pixels from its box crop: at 224 (the inference mask's
    # size) they are the full-resolution mask's (detectron2's) for boxes up to 130 px a side
    # (0.58 x 224, methods/pointrend.py point_labels), the crop's nearest cells beyond.
    c.input.mask_size = 224
    # detectron2's POOLER_SAMPLING_RATIO 0 (defaults.py, box pooler; the coarse mask head's
    # point-sampled pooling is RoIAlign with 1 sample per bin): adaptive RoIAlign,
    # ceil(RoI side / pool size) samples per bin axis, exact up to RoI sides of
    # model.adaptive_sampling_max_side (42) cells of their level (ops/roi_align.py).
    c.model.sampling_ratio = 0
    return common.accelerator_recipe(c, arg)
