"""xieenze/PolarMask's polar_768_1x_r50 on COCO 2017 (configs/polarmask/4gpu/
polar_768_1x_r50.py), for GPU/TPU users (not run here).

    instseg-jax train --config experiments/polarmask_r50_fpn_coco_1x.py --workdir runs/pm_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

An FCOS R-50 detector with three GroupNorm towers (classes and centerness; a box trained by
IoU loss weighted by the polar centerness, which NMS uses; 36 ray lengths, exp of a per-level
scale x the output), mass-centre sampling, polar IoU loss, detections scored class x
(centerness + 0.5); instances of <= 15 mask pixels or under 10 x 10 px dropped from training
(counted); every image stretched to 768 x 1280 (h x w, aspect ratio not kept, training and
test, as the reference's resize_keep_ratio=False), which is the canvas, batch 16, SGD lr
0.01, 500 warmup steps from lr / 3, 12 epochs with decays after 8 and 11, gradients clipped at
35; ImageNet weights through --config.model.backbone_weights. The reference's README reports
28.9 mask AP on COCO minival (4 GPUs, R-50 1x); this file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import polarmask


def get_config(arg=None):
    c = polarmask.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    # coco_seg.py _parse_ann_info: instances of <= 15 mask pixels, or under 10 x 10 px, are no
    # training targets there (counted here as small_instance_dropped).
    c.input.instance_filter = "coco_seg"
    # img_scale=(1280, 768) (w, h) with resize_keep_ratio=False, training and test: every image
    # stretched to 768 x 1280 (h, w), which is the canvas (both sides multiples of 128, the
    # coarsest FPN level's stride).
    c.input.resize = "stretch"
    c.input.stretch_hw = (768, 1280)
    c.input.canvas_hw = (768, 1280)
    return common.accelerator_recipe(c, arg)
