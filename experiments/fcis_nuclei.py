"""FCIS on the real DSB 2018 nuclei set, sized for a 2-core CPU (the Mask R-CNN nuclei
experiment's data, canvas, backbone and budget, so the two compare).

    make data
    instseg-jax train --config experiments/fcis_nuclei.py --workdir runs/fcis_nuclei

Choices, and why: the 256x256 canvas and ResNet-18 with GroupNorm from scratch of
experiments/maskrcnn_nuclei.py, with FCIS's trunk (res5 dilated, both res4 and res5 at stride
16: 16 x 16 score maps); one anchor level at stride 16 with sizes 8-128 px (nuclei are 3-60 px
across), 2000 proposals before NMS and 300 after, as the reference; the reference's k = 7
position groups and 21 x 21 masks, 128 OHEM RoIs per image and its loss weights; a 256-channel
conv_new_1 and RPN conv (the reference's 1024 and 512 cost most of a CPU step); 200
detection slots and COCOeval at maxDets 200 beside COCO's 100 (up to 101 nuclei in a val
image); box crops of 42 (twice the mask side) for the mask targets; SGD lr 0.01 with 200
warmup steps and cosine decay over 2000 steps, gradients clipped at global norm 10; val AP
every 500 steps, the best checkpoint kept in workdir/best. Results:
experiments/benchmarks/RESULTS.md, "FCIS nuclei quality run".

At stride 16 a median nucleus (14 px) spans about one score-map cell, so each of its 21 x 21
mask bins reads one of the 7 x 7 position groups of that cell or its neighbour: the nuclei set
is a hard case for FCIS's resolution, kept as the reference builds it for the comparison.

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import fcis


def get_config(arg=None):
    c = common.nuclei_experiment(fcis.base_config(), arg)
    c.input.mask_size = 42
    m = c.model
    m.anchor_sizes = (8.0, 16.0, 32.0, 64.0, 128.0)
    m.rpn_pre_nms_topk_train = 2000
    m.rpn_pre_nms_topk_test = 2000
    m.rpn_min_size = 0.0
    m.rpn_channels = 256
    m.head_channels = 256
    m.detections_per_image = 200
    c.optim.lr = 0.01
    c.schedule.total_steps = 2000
    return common.finish(c, arg)
