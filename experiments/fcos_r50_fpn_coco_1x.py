"""AdelaiDet's FCOS R_50_1x on COCO 2017 (configs/FCOS-Detection/R_50_1x.yaml, with its
Base-FCOS.yaml), boxes only, for GPU/TPU users (not run here).

    instseg-jax train --config experiments/fcos_r50_fpn_coco_1x.py --workdir runs/fcos_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

Batch 16, SGD lr 0.01, weight decay 1e-4, 90k steps with decays at 60k and 80k, 1000 warmup
steps from lr / 1000 (detectron2's default: no AdelaiDet file sets another); single-scale
training at short side 800 (R_50_1x.yaml overrides Base-FCOS.yaml's 640..800; the MS_ files
train multi-scale), long side <= 1333, and 800 x 1333 at test, on the 1408 x 1408 canvas (P7's stride 128 divides it); FrozenBN ResNet-50 with the stem and res2 frozen (ImageNet
weights through --config.model.backbone_weights, the command above); FPN P3..P7 with
P6 from P5; 4 GroupNorm convs per tower, centre sampling 1.5 strides, GIoU weighted by the
centerness targets; test: class score > 0.05, 1000 candidates per level, NMS 0.6, 100
detections. AdelaiDet's README reports 38.7 box AP on COCO val2017 for this schedule
(torchvision's fcos_resnet50_fpn: 39.2); this file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import fcos


def get_config(arg=None):
    c = fcos.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.short_side = (800,)  # R_50_1x.yaml: INPUT.MIN_SIZE_TRAIN (800,)
    return common.accelerator_recipe(c, arg)
