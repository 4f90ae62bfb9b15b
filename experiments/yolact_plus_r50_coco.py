"""dbolya/yolact's YOLACT++ R-50 (data/config.py yolact_plus_resnet50_config) on COCO 2017, for
GPU/TPU users (not run here).

    instseg-jax train --config experiments/yolact_plus_r50_coco.py --workdir runs/yolact_plus \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth; the reference starts from
resnet50-19c8e357.pth, torchvision's older copy), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights. The deformable convolutions' offset and modulation
layers start at zero (weights/resnet.py).

The reference's settings: batch 8, SGD lr 1e-3 (momentum 0.9, weight decay 5e-4), 500 warmup
iterations from 1e-4, 800k iterations with x 0.1 at 280k, 600k, 700k and 750k; ResNet-50 with
modulated deformable 3x3s in every block of res3..res5 (resnet50_dcnv2_backbone), FrozenBN with
the stem frozen (the reference trains its batch norms: freeze_bn False); anchors 24..384 x 2^(0,
1/3, 2/3), ratios 1, 1/2, 2; the fast mask re-scoring head (weight 25, masks over 25 prototype
cells) and scores x predicted mask IoU at test. Its SSD augmentation (utils/augmentations.py
SSDAugmentation): photometric distortion, Expand 1-4 with probability 1/2 filled with the
pixel mean, the random sample crop with min IoUs 0.1, 0.3, 0.7, 0.9, any crop or none (sides
0.3-1), mirror, then the 550 x 550 stretch, at training and test, on a 640 x 640 canvas
(instseg_jax/methods/yolact.py and yolact_plus.py: what still differs; input/ssd_augment.py is
mmdetection's form of these steps). dbolya/yolact reports 34.1 mask AP on COCO test-dev at
33.5 FPS on a Titan Xp (README, yolact_plus_resnet50_54_800000.pth). This file has not
reproduced it.

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import yolact_plus


def get_config(arg=None):
    c = yolact_plus.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    # SSDAugmentation: Expand (ratio 1-4, probability 1/2), RandomSampleCrop (sample_options:
    # none, min IoU 0.1, 0.3, 0.7, 0.9, any; sides 0.3-1), photometric distortion, mirror.
    c.input.expand_ratio = (1.0, 4.0)
    c.input.expand_prob = 0.5
    c.input.min_iou_crop = (0.1, 0.3, 0.7, 0.9)
    c.input.min_crop_size = 0.3
    c.input.photometric = True
    # max_size 550, preserve_aspect_ratio False: every image stretched to 550 x 550, training
    # and test, on the 640 x 640 canvas (a multiple of 128, the coarsest level's stride).
    c.input.resize = "stretch"
    c.input.stretch_hw = (550, 550)
    # make_priors places anchors on the 550 x 550 image: strides 550 / (69, 35, 18, 9, 5).
    c.model.anchor_extent_hw = (550, 550)
    return common.accelerator_recipe(c, arg)
