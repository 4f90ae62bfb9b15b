"""detectron2's Panoptic FPN R50-FPN 1x on COCO 2017 panoptic (COCO-PanopticSegmentation,
panoptic_fpn_R_50_1x.yaml over Base-Panoptic-FPN.yaml), for GPU/TPU users (not run here).

    instseg-jax train --config experiments/panoptic_fpn_r50_coco_1x.py --workdir runs/pfpn_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/panoptic_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.input.train_split.panoptic=COCO_ROOT/annotations/panoptic_train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Mask R-CNN R50-FPN 1x's detector and schedule (experiments/maskrcnn_r50_fpn_coco_1x.py: batch
16, lr 0.02, 90k steps, decays at 60k and 80k) on COCO's 80 thing categories, with the semantic
FPN head over the 53 stuff categories + "things" (128 channels, GroupNorm, stride 4, loss
weight 0.5), images without things kept in training (FILTER_EMPTY_ANNOTATIONS False), and the
combination at detectron2's thresholds (instances of score >= 0.5, overlap 0.5, stuff regions
of >= 4096 original pixels). The data is COCO's panoptic release read directly
(input/coco_panoptic.py): thing masks come from the panoptic PNGs, where detectron2's
"panoptic_separated" datasets take them from instances_train2017.json. detectron2's model zoo
reports PQ 39.4, box AP 37.6, mask AP 34.7 on val2017 for this recipe; this file has not
reproduced it.
`:smoke` shrinks everything to synthetic scenes with stuff bands for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import panoptic_fpn


def get_config(arg=None):
    c = panoptic_fpn.base_config()
    c.input.source = "coco_panoptic"
    c.input.train_split.annotations = "data/coco/annotations/panoptic_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.train_split.panoptic = "data/coco/annotations/panoptic_train2017"
    c.input.eval_split.annotations = "data/coco/annotations/panoptic_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.eval_split.panoptic = "data/coco/annotations/panoptic_val2017"
    c.input.filter_empty = False
    # Every sampled positive trains the mask head (up to 512 x 0.25), as in the reference.
    c.model.mask_fg_per_image = 128
    # detectron2's POOLER_SAMPLING_RATIO 0 (defaults.py, box and mask poolers):
    # adaptive RoIAlign, ceil(RoI side / pool size) samples per bin axis, exact up to RoI sides
    # of model.adaptive_sampling_max_side (42) cells of their level (ops/roi_align.py).
    c.model.sampling_ratio = 0
    # The reference rasterises COCO's polygons inside each RoI at 28 x 28
    # (detectron2's default INPUT.MASK_FORMAT "polygon"); from the box crop
    # the closest rule is the adaptive one (experiments/parity/mask_target_rules.py).
    c.model.mask_target_sampling_ratio = 0
    return common.accelerator_recipe(c, arg)
