"""mmdetection's Mask Scoring R-CNN R50-FPN 1x on COCO 2017 (configs/ms_rcnn/
ms-rcnn_r50-caffe_fpn_1x_coco.py over mask_rcnn/mask-rcnn_r50-caffe_fpn_1x_coco.py), for
GPU/TPU users (not run here).

    instseg-jax train --config experiments/ms_rcnn_r50_fpn_coco_1x.py --workdir runs/ms_rcnn_1x \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights. The reference starts from detectron2's Caffe-style
ResNet-50 (open-mmlab://detectron2/resnet50_caffe, BGR pixels, unit std); torchvision's is the
ImageNet backbone the package imports.

Mask R-CNN R50-FPN 1x's detector (experiments/maskrcnn_r50_fpn_coco_1x.py) at mmdetection's
training rules (mask-rcnn_r50_fpn_1x_coco.py, schedule_1x.py, coco_instance.py): batch 16, SGD
lr 0.02, 12 epochs with decays after 8 and 11 (7330 steps per epoch at batch 16, as the
PolarMask recipe counts them), 500 linear warmup steps from lr x 0.001, single-scale 800 x 1333
input, the RPN losses divided by the anchors sampled (avg_factor), adaptive RoIAlign (its
sampling_ratio 0, aligned), every sampled positive training the mask branch, and the MaskIoU
head at the reference's settings (the defaults of methods/ms_rcnn.py: 4 convs x 256, 2 FC x
1024, targets from logits above 0.5, loss weight 0.5). mmdetection's configs/ms_rcnn/README.md
reports 38.2 box AP / 36.0 mask AP on COCO val2017 for this recipe (its Mask R-CNN R50-caffe
1x: 38.0 / 34.4); this file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import ms_rcnn

# COCO train2017's 117,266 images with annotations at batch 16.
STEPS_PER_EPOCH = 7330


def get_config(arg=None):
    c = ms_rcnn.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    # Every sampled positive trains the mask and MaskIoU heads (up to 512 x 0.25), as there.
    c.model.mask_fg_per_image = 128
    # mmdetection's RoIAlign sampling_ratio 0 (bbox and mask roi extractors): adaptive,
    # ceil(RoI side / pool size) samples per bin axis, exact up to RoI sides of
    # model.adaptive_sampling_max_side (42) cells of their level (ops/roi_align.py).
    c.model.sampling_ratio = 0
    # The reference's targets are the gt masks cropped and resized by RoIAlign with
    # adaptive sampling (BitmapMasks.crop_and_resize); from the box crop, the adaptive rule.
    c.model.mask_target_sampling_ratio = 0
    # schedule_1x.py: LinearLR from 0.001 over 500 iterations, MultiStepLR at epochs 8 and 11.
    c.schedule.warmup_steps = 500
    c.schedule.total_steps = 12 * STEPS_PER_EPOCH
    c.schedule.steps = (8 * STEPS_PER_EPOCH, 11 * STEPS_PER_EPOCH)
    # coco_instance.py: Resize(scale=(1333, 800), keep_ratio=True), train and test.
    c.input.short_side = (800,)
    # RPNHead's losses take avg_factor = the anchors sampled (detectron2: the 256 budget).
    c.model.rpn_loss_normalizer = "sampled"
    return common.accelerator_recipe(c, arg)
