"""Mask R-CNN on the real DSB 2018 nuclei set, sized for a 2-core CPU.

    make data
    instseg-jax train --config experiments/maskrcnn_nuclei.py --workdir runs/nuclei

Choices, and why: a 256x256 canvas (the images are 256-360 px: 360x360 images are scaled to
256, others kept near native); ResNet-18 with GroupNorm trained from scratch (no pretrained
weights may be downloaded here) and a 128-channel FPN; anchors 8..128 px because nuclei are
3-60 px across; up to 128 instances per image (measured on the prepared split: at most 151
nuclei in a train image, 2 of 459 train images above 128, median 23; at most 101 in a val image;
beyond 128 the largest are kept and the rest counted); evaluation at the test size 256 (the
canvas) with 200 detection slots and COCOeval at maxDets 200 beside COCO's 100; 256 RoIs per
image, of which up to 32 feed a mask head of 2 convolutions (the mask head's convolution
gradients dominate a CPU step: with 4 convs and 64 RoIs a step took 3.4 s, with 2 and 32 it
takes 1.4 s at batch 4); SGD lr 0.02 with 200 warmup steps and cosine decay over 2000 steps,
which fit in under an hour on the 2-core CPU; gradients clipped at global norm 10 (without it a shorter warmup diverged); val AP every 500
steps, the best checkpoint kept in workdir/best.

Result (2026-11-22, 2 CPU cores, 58 min including compilation and four evaluations): segm AP
0.513 / AP50 0.830, bbox AP 0.493 / AP50 0.835 on the val split at the test size 256
(experiments/benchmarks/RESULTS.md).
`:demo` is the 400-step budget of `make demo`; `:smoke` shrinks everything to synthetic scenes
for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import mask_rcnn


def get_config(arg=None):
    c = common.nuclei_detector(common.nuclei_experiment(mask_rcnn.base_config(), arg))
    c.model.mask_head_convs = 2
    if arg == "demo":  # `make demo`: the same model on a budget that fits ~10 minutes here
        c.schedule.total_steps = 400
        c.schedule.warmup_steps = 100
        c.checkpoint.every_steps = 200
        return common.finish(c, None)
    return common.finish(c, arg)
