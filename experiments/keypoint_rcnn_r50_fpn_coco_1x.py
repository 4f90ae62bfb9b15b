"""detectron2's Keypoint R-CNN R50-FPN 1x on COCO 2017 person keypoints
(configs/COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml over Base-Keypoint-RCNN-FPN.yaml), for
GPU/TPU users (not run here).

    instseg-jax train --config experiments/keypoint_rcnn_r50_fpn_coco_1x.py --workdir runs/kp_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/person_keypoints_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Mask R-CNN R50-FPN 1x's detector and schedule (batch 16, lr 0.02, 90k steps, decays at 60k and
80k, short sides 640..800) without the mask head, with 1500 RPN proposals per training image
and the keypoint head (8 x conv3x3-512, 4x4 stride-2 transposed conv, 2x bilinear: 56x56
heatmaps of COCO's 17 person keypoints) trained on every sampled positive (up to 512 x 0.25),
the loss averaged over visible keypoints. Not carried over: the reference's smooth-L1 box loss
with beta 0.5 (this package's box loss is detectron2's default L1). detectron2's MODEL_ZOO.md
reports 53.6 box AP / 64.0 keypoint AP on COCO val2017 for this recipe; this file has not
reproduced it.
`:smoke` shrinks everything to synthetic keypoint scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import keypoint_rcnn


def get_config(arg=None):
    c = keypoint_rcnn.base_config()
    c.input.train_split.annotations = "data/coco/annotations/person_keypoints_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/person_keypoints_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.model.keypoint_fg_per_image = 128
    # detectron2's POOLER_SAMPLING_RATIO 0 (defaults.py, box and keypoint poolers):
    # adaptive RoIAlign, ceil(RoI side / pool size) samples per bin axis, exact up to RoI sides
    # of model.adaptive_sampling_max_side (42) cells of their level (ops/roi_align.py).
    c.model.sampling_ratio = 0
    return common.accelerator_recipe(c, arg)
