"""YOLACT on the real DSB 2018 nuclei set, sized for a 2-core CPU (the Mask R-CNN and SOLOv2
nuclei experiments' data, canvas, backbone and budget, so the three compare).

    make data
    instseg-jax train --config experiments/yolact_nuclei.py --workdir runs/yolact_nuclei

Choices, and why: the 256x256 canvas, ResNet-18 with GroupNorm from scratch and a 128-channel
pyramid (P3..P7 here); anchors of 8..128 px (the reference's 24..384 px are for COCO objects on
a 550 px input; nuclei are 5-47 px, sqrt of box area on the canvas, 1st-99th percentile), so
the smallest nuclei still reach IoU 0.5 with some anchor; 32 prototypes of 128 channels; class,
box and coefficient predictors drawn from a normal of std 0.01 (the reference's Xavier, meant
for an ImageNet backbone, gave first losses of ~20 on one from scratch); up to
100 mask slots per image (the reference's) and 200 detection slots with COCOeval at maxDets 200
beside COCO's 100 (up to 101 nuclei in a val image); SGD lr 0.01 (the reference's 1e-3 is for
ImageNet-initialised weights) with 200 warmup steps and cosine decay over 5500 steps (0.56 s each here: with
eleven evaluations they fit in under an hour), gradients
clipped at global
norm 10; val AP every 500 steps, the best checkpoint kept in workdir/best.

Results: experiments/benchmarks/RESULTS.md, "YOLACT nuclei quality run" (0.296 after 5500
steps at f686f29; 0.298 after 2000 at 85910b0's training rules on a slower host).

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import yolact


def get_config(arg=None):
    c = common.nuclei_experiment(yolact.base_config(), arg)
    m = c.model
    m.anchor_sizes = (8, 16, 32, 64, 128)
    m.proto_channels = 128
    m.predictor_init = "normal"  # backbone from scratch: Xavier's first losses were ~20
    m.detections_per_image = 200
    c.optim.lr = 0.01
    c.optim.weight_decay = 1e-4
    c.schedule.total_steps = 5500
    c.schedule.warmup_factor = 0.001
    return common.finish(c, arg)
