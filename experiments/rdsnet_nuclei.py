"""RDSNet on the real DSB 2018 nuclei set, sized for a 2-core CPU (the other nuclei experiments'
data, canvas, backbone and budget, so their figures compare).

    make data
    instseg-jax train --config experiments/rdsnet_nuclei.py --workdir runs/rdsnet_nuclei

Choices, and why: the 256x256 canvas, ResNet-18 with GroupNorm from scratch and a 128-channel
pyramid (P3..P7) and pixel stream; anchors of 8..161 px (octave base 1 where the reference's 4
is for COCO objects: nuclei are 5-47 px on the canvas, sqrt of box area, 1st-99th percentile,
and with 32 px anchors the smallest would reach IoU 0.5 with none); every positive's mask may
train (mask_min_area 0: the reference's 100 px floor would leave out the nuclei under 10 x 10
px, a large share of them); up to 100 mask slots per image (the reference's) and 200 detection
slots with COCOeval at maxDets 200 beside COCO's 100 (up to 101 nuclei in a val image); SGD lr
0.01 with 200 warmup steps and cosine decay over 4500 steps, gradients clipped at global norm
10; val AP every 500 steps, the best checkpoint kept in workdir/best.

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import rdsnet


def get_config(arg=None):
    c = common.nuclei_experiment(rdsnet.base_config(), arg)
    m = c.model
    m.anchor_octave_base = 1.0
    m.pixel_channels = 128
    m.mask_min_area = 0.0
    m.detections_per_image = 200
    c.optim.lr = 0.01
    c.optim.weight_decay = 1e-4
    c.schedule.total_steps = 4500
    c.schedule.warmup_factor = 0.001
    return common.finish(c, arg)
