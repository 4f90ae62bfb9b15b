"""msracver/FCIS's ResNet-101 COCO recipe (experiments/fcis/cfgs/
resnet_v1_101_coco_fcis_end2end_ohem.yaml) on COCO 2017, for GPU/TPU users (not run here).

    instseg-jax train --config experiments/fcis_r101_coco.py --workdir runs/fcis \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet101-63fe2227.pth

resnet101-63fe2227.pth is torchvision's ImageNet ResNet-101 (ResNet101_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet101-63fe2227.pth), fetched once where there is
internet (docs/getting_started.md, "Pretrained backbones"); without it training refuses to
start: a FrozenBN ResNet needs those weights. The reference starts from MSRA's Caffe ResNet-101
(BGR pixels minus the mean, no division), which is not available here.

The reference's settings: images resized to a short side of 600 (long side at most 1000) on a
1008 x 1008 canvas, flipped half the time; 8 images per step, one per GPU (here one per chip on
8); 8 epochs of train2014 + valminusminival2014 (train2017 is the same images), 118k steps,
the lr divided by 10 after 5.33 epochs (78.6k steps), 250 warmup steps from lr / 10 (the
reference holds lr / 10 over them); SGD momentum 0.9. The reference sums the 8 GPUs' gradients
of their per-image losses (rescale_grad 1) at lr 0.0005 and weight decay 5e-4; the losses here
are means over the batch's images (methods/fcis.py), so lr 0.004 = 8 x 0.0005 takes the same
steps and weight decay 6.25e-5 = 5e-4 / 8 the same decay per step. FrozenBN ResNet-101 with the
stem and res2 frozen (FIXED_PARAMS), res5 dilated at stride 16. The RPN trains on 256 anchors,
proposals 6000 -> 300 at NMS 0.7; every proposal and ground truth is an RoI and OHEM keeps 128
per image; k = 7, 21 x 21 masks; loss weights 1, 10, 1. Test: the 300 proposals and their
regressed boxes scored (TEST.ITER 2), NMS 0.3 per class, 100 detections, mask voting at 0.5
(TEST.USE_MASK_MERGE; methods/fcis.py lists how it and the rest differ from the reference). The FCIS README reports 29.2 mask AP
(mAP@[0.5:0.95]) on COCO test-dev for this recipe with OHEM (the survey's table: 29.2); this
file has not reproduced it.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import fcis


def get_config(arg=None):
    c = fcis.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    c.input.global_batch = 8
    c.model.depth = 101
    # 21 x 21 targets from the box crops: the adaptive RoIAlign rule (ops.mask_targets), closest
    # to resizing the full mask's crop as the reference does.
    c.model.mask_target_sampling_ratio = 0
    c.optim.lr = 0.004
    c.optim.momentum = 0.9
    c.optim.weight_decay = 6.25e-5
    c.schedule.total_steps = 118_000
    c.schedule.steps = (78_600,)
    c.schedule.warmup_steps = 250
    c.schedule.warmup_factor = 0.1
    return common.accelerator_recipe(c, arg)
