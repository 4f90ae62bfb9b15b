"""InstanceFCN (Dai et al., ECCV 2016) with the paper's head settings on COCO 2017, for GPU/TPU
users (not run here).

    instseg-jax train --config experiments/instancefcn_r50_coco.py --workdir runs/instancefcn \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

The paper's settings (section 4): k = 5 relative positions, windows of m = 21 cells at stride 8
(here FPN P3; P2 and P4-P6 stand for the octaves of its image pyramid, 15-cell windows for the
half octaves: instseg_jax/methods/instancefcn.py says why; objects from 29 px up have positive
windows), 512-d branches, 256 windows per
image at positives : negatives 1 : 1 with DeepMask's window rules, logistic objectness plus
per-pixel logistic mask loss. Its trunk is an ImageNet VGG-16 with dilated conv5; here a
FrozenBN ImageNet ResNet-50 with an FPN (the library has no dilated trunk). The paper gives no
schedule this file could follow to the step; it uses batch 16 (2 per chip on 8), SGD lr 0.01
for 90k steps with decays at 60k and 80k and 500 warmup steps (Mask R-CNN's 1x on COCO), the
images at one short side of 600 px (at most 1000) on a 1024 canvas, bfloat16 compute, 1000
proposals per image (COCOeval at maxDets 1000).

Published figure (the paper's Table on MS COCO segment proposals, first 5k val images,
class-agnostic): AR@10 16.6, AR@100 31.7, AR@1000 39.2 (DeepMask 12.6 / 24.5 / 33.1 in the same
table; quoted without the paper at hand, to be checked against it). This recipe detects 80 classes with a per-class objectness (the module docstring) and
is evaluated by COCO's per-class segm AP, not by class-agnostic AR; it has not been run.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import instancefcn


def get_config(arg=None):
    c = instancefcn.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.canvas_hw = (1024, 1024)
    c.input.short_side = (600,)
    c.input.max_long_side = 1000
    c.input.test_short_side = 600
    c.input.test_max_long_side = 1000
    # P2 too: the paper's pyramid reaches small objects by upscaling the image; on P3-P6 alone
    # no window takes an object under 58 px (model.window_cells' canonical sizes, 2^(-1/4)).
    c.model.levels = (2, 3, 4, 5, 6)
    c.model.detections_per_image = 1000
    c.eval.max_detections = 1000
    return common.accelerator_recipe(c, arg)
