"""mmdetection's YOLACT R50 (configs/yolact/yolact_r50_1x8_coco.py) on COCO 2017, for GPU/TPU
users (not run here).

    instseg-jax train --config experiments/yolact_r50_coco.py --workdir runs/yolact \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Batch 8, SGD lr 1e-3 (weight decay 5e-4), 55 epochs with decays at epochs 20, 42, 49 and 52,
500 warmup steps from lr x 0.1; FrozenBN ResNet-50 with the stem frozen (ImageNet weights through
--config.model.backbone_weights, the command above; mmdetection trains its batch norms). The
reference's training augmentation (yolact_r50_1xb8-55e_coco.py train_pipeline): Expand (zoom-out
by 1-4 with probability 1/2, filled with the pixel mean), MinIoURandomCrop (min IoUs 0.1, 0.3,
0.5, 0.7, 0.9 or no crop, sides 0.3-1), flip and PhotoMetricDistortion (instseg_jax/input/
ssd_augment.py; the distorted pixels are clipped to uint8 where the reference keeps floats).
Images are stretched to 550 x 550 as the reference's Resize(keep_ratio=False) (input.resize
"stretch"), at training and test, on a 640 x 640 canvas (instseg_jax/methods/yolact.py: what
still differs). mmdetection reports 29.0 mask AP on COCO
val2017 for this config; dbolya/yolact 28.2 on test-dev at 42.5 FPS on a Titan Xp. This file
has not reproduced them.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import yolact


def get_config(arg=None):
    c = yolact.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    # mmdetection's Expand(ratio_range=(1, 4)) (prob 0.5, its default), MinIoURandomCrop(
    # min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3), PhotoMetricDistortion(32,
    # (0.5, 1.5), (0.5, 1.5), 18).
    c.input.expand_ratio = (1.0, 4.0)
    c.input.expand_prob = 0.5
    c.input.min_iou_crop = (0.1, 0.3, 0.5, 0.7, 0.9)
    c.input.min_crop_size = 0.3
    c.input.photometric = True
    # Resize(img_scale=(550, 550), keep_ratio=False), training and test: every image stretched
    # to 550 x 550 (dbolya/yolact utils/augmentations.py Resize likewise), on the 640 x 640
    # canvas (a multiple of 128, the coarsest level's stride).
    c.input.resize = "stretch"
    c.input.stretch_hw = (550, 550)
    # Its anchors span the 550 x 550 image: strides 550 / (69, 35, 18, 9, 5), not 8 .. 128.
    c.model.anchor_extent_hw = (550, 550)
    return common.accelerator_recipe(c, arg)
