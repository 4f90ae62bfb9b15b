"""Mask Scoring R-CNN on the real DSB 2018 nuclei set, sized for a 2-core CPU: Mask R-CNN's
nuclei experiment (experiments/maskrcnn_nuclei.py: the same backbone, pyramid, anchors, RoI
budgets, 2-conv mask head, schedule and evaluation) with mmdetection's MaskIoU head added.

    make data
    instseg-jax train --config experiments/ms_rcnn_nuclei.py --workdir runs/ms_rcnn_nuclei

Choices, and why: the MaskIoU head at the pyramid's 128 channels with 2 convolutions (the
second with stride 2) and 2 FC x 512 (the box head's width here), for the reason Mask R-CNN's
nuclei mask head has 2 convolutions: the 3x3 convolutions' gradients on the 14x14 RoIs dominate
a CPU step (mmdetection's 4 x 256 and 2 FC x 1024 are sized for COCO's 80 classes); the
reference's targets, loss weight 0.5 and test-time rescoring (methods/ms_rcnn.py); the same
2000 steps as Mask R-CNN's figure so the two compare at one budget.
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import ms_rcnn


def get_config(arg=None):
    c = common.nuclei_detector(common.nuclei_experiment(ms_rcnn.base_config(), arg))
    c.model.mask_head_convs = 2
    c.model.maskiou_num_convs = 2
    c.model.maskiou_conv_dim = 128
    c.model.maskiou_fc_dim = 512
    return common.finish(c, arg)
