"""InstanceFCN on the real DSB 2018 nuclei set, sized for a 2-core CPU (the nuclei experiments'
shared data, canvas, ResNet-18 GroupNorm backbone, 128-channel FPN and budget, so the methods
compare: instseg_jax/configs/common.py nuclei_experiment).

    make data
    instseg-jax train --config experiments/instancefcn_nuclei.py --workdir runs/instancefcn_nuclei

Choices, and why: nuclei are 5-47 px (sqrt of box area on the canvas, 1st-99th percentile;
median 14), so the windows slide on P2 and P3 (strides 4 and 8) with sides of 5, 7, 9 and 13
cells: DeepMask's canonical object (128/224 of the window) is then 11, 16, 21 and 30 px on P2 and
twice that on P3, about half an octave apart, so that every nucleus from about 10 px up is a
positive for some window (smaller ones are near-misses: off scale by less than a factor 2, they
are never sampled as negatives). The paper's k = 5 relative positions, 256 windows per image at
1 : 1, 128-d branches (the paper's 512 on a 2-core CPU would dominate the step), 13 x 13 output
masks, 6000 windows assembled at test (each nucleus has tens of high-scoring windows:
neighbouring positions and sides), NMS at box IoU 0.7, 200 detection slots (up to 101 nuclei
in a val image); SGD lr 0.01 with 200 warmup steps and cosine decay over 3000 steps. Results:
experiments/benchmarks/RESULTS.md, "InstanceFCN nuclei quality run".

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import instancefcn


def get_config(arg=None):
    c = common.nuclei_experiment(instancefcn.base_config(), arg)
    m = c.model
    m.levels = (2, 3)
    m.window_cells = (5, 7, 9, 13)
    m.branch_channels = 128
    m.pre_nms_topk = 6000
    m.detections_per_image = 200
    c.optim.lr = 0.01
    c.schedule.total_steps = 3000
    return common.finish(c, arg)
