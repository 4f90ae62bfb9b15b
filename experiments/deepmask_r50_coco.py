"""facebookresearch/deepmask's DeepMask (train.lua's defaults, the ResNet-50 version the SharpMask
paper reports) on COCO 2017, for GPU/TPU users (not run here).

    instseg-jax train --config experiments/deepmask_r50_coco.py --workdir runs/deepmask \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights (the reference starts from fb.resnet.torch's ResNet-50 with
its BatchNorm fixed and trains every layer).

The reference's settings (instseg_jax/methods/deepmask.py, base_config): the trunk to res4
(res5 is computed and unread: the backbone weights loader wants torchvision's four stages, so
model.stage_blocks stays ResNet-50's), windows of 192 px whose central 160 carry a 56 x 56 mask (upsampled to 112
for the loss) of an object of max side 92, shift 16 px, scale jitter 2^+-0.25; 16 images x 4
windows per step (2 positive), the mask loss x 32 (the reference's lambda = 1/32 on the score);
SGD momentum 0.9, weight decay 5e-4, lr 1e-3, halved at 100k and 240k steps of 600k (the
reference's 300 epochs of 4000 batches of 32 windows, a step being a mask batch and a score
batch); COCO images at their own size (long side 640 on a 640 canvas); test at scales 2^-2.5
.. 2^0.5, the best 1000 windows, masks at probability 0.2, no NMS, COCOeval at maxDets 1000.

Class-agnostic proposals: every detection is class 0 and COCOeval runs with useCats 0
(eval.class_agnostic), so the 80 classes count as one "object", as the reference's
evalPerImage.lua scores them; its AR@10/100/1000 rows are the paper's measure. The reference's
README gives no AR table; the SharpMask paper (Pinheiro et al., ECCV 2016) reports this
DeepMask's segment AR on COCO val; this file has not reproduced it.

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import deepmask


def get_config(arg=None):
    c = deepmask.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    return common.accelerator_recipe(c, arg)
