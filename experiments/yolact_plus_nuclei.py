"""YOLACT++ on the real DSB 2018 nuclei set, sized for a 2-core CPU: YOLACT's nuclei experiment
(experiments/yolact_nuclei.py: data, 256x256 canvas, ResNet-18 with GroupNorm from scratch,
128-channel pyramid, budget) with the YOLACT++ changes, so the two compare.

    make data
    instseg-jax train --config experiments/yolact_plus_nuclei.py --workdir runs/yolact_plus_nuclei

Choices, and why: YOLACT's nuclei anchors 8..128 px, each with YOLACT++'s three scales x 2^(0,
1/3, 2/3) and ratios (1, 2, 0.5): 9 per location; deformable 3x3s in every block of res3..res5
(the R-50 recipe's placement on the ResNet-18's two blocks per stage; a basic block's strided
3x3, instseg_jax/methods/yolact_plus.py); the mask IoU head of the reference (five stride-2
convolutions reduce the 64-cell prototype grid to 1 x 1), its weight 25 and area rule (25
cells); class, box and coefficient predictors from a normal of std 0.01 (Xavier's first
losses were ~20 from scratch); up to 100 mask slots per image and 200 detection slots with
COCOeval at maxDets 200 beside COCO's 100; SGD lr 0.01 with 200 warmup steps and cosine decay
over 5500 steps, gradients clipped at global norm 10, as YOLACT's; val AP every 500 steps, the
best checkpoint kept in workdir/best. Results: experiments/benchmarks/RESULTS.md, "YOLACT++
nuclei quality run" (2500 of the 5500 steps, what fit the hour on a slow host).

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import yolact_plus


def get_config(arg=None):
    c = common.nuclei_experiment(yolact_plus.base_config(), arg)
    m = c.model
    m.anchor_sizes = (8, 16, 32, 64, 128)
    m.dcn_layers = (0, 2, 2, 2)
    m.proto_channels = 128
    m.predictor_init = "normal"  # backbone from scratch: Xavier's first losses were ~20
    m.detections_per_image = 200
    c.optim.lr = 0.01
    c.optim.weight_decay = 1e-4
    c.schedule.total_steps = 5500
    c.schedule.warmup_factor = 0.001
    return common.finish(c, arg)
