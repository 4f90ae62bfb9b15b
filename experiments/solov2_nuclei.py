"""SOLOv2 on the real DSB 2018 nuclei set, sized for a 2-core CPU (the Mask R-CNN nuclei
experiment's data, canvas, backbone and budget, so the two compare).

    make data
    instseg-jax train --config experiments/solov2_nuclei.py --workdir runs/solov2_nuclei

Choices, and why: the 256x256 canvas, ResNet-18 with GroupNorm from scratch and the 128-channel
FPN of experiments/maskrcnn_nuclei.py; the reference's grids (40, 36, 24, 16, 12) and strides,
but scale ranges a quarter of COCO's, because nuclei are 5-47 px (sqrt of box area on the
canvas, 1st-99th percentile; median 14) where COCO's objects on an 800-1333 px input are 4-5
times larger; category and kernel towers of 2 convs x 128 channels and a 64-channel mask
branch with 128-long kernels (the reference's 4 x 512 towers cost 150 GFLOP per image on the
3872 cells); 256 positive (cell, instance) slots per image (up to 128 nuclei, each on up to two
levels); 200 detection slots and COCOeval at maxDets 200 beside COCO's 100 (up to 101 nuclei
in a val image); SGD lr 0.01 with 200 warmup steps and cosine decay over 3500 steps (0.85 s each here: with
seven evaluations they fit in under an hour), gradients clipped at
global norm 10; val AP every 500 steps, the best checkpoint kept in workdir/best.
Results: experiments/benchmarks/RESULTS.md, "SOLOv2 nuclei quality run" (0.390 after 3500
steps; rerun after issue 28's training rules: 0.355 after 1500 of them, against 0.334 at step
1500 of the first run).

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import solov2


def get_config(arg=None):
    c = common.nuclei_experiment(solov2.base_config(), arg)
    m = c.model
    m.scale_ranges = ((1, 24), (12, 48), (24, 96), (48, 192), (96, 512))
    m.head_channels = 128
    m.head_convs = 2
    m.mask_feature_channels = 64
    m.mask_channels = 128
    m.positive_slots_per_image = 256
    m.min_mask_area_per_stride = 0.0  # a 6 px nucleus covers 2 x 2 cells at stride 4
    m.detections_per_image = 200
    c.optim.lr = 0.01
    c.schedule.total_steps = 3500
    return common.finish(c, arg)
