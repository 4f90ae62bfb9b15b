"""PANet on the real DSB 2018 nuclei set, sized for a 2-core CPU: Mask R-CNN's nuclei experiment
(experiments/maskrcnn_nuclei.py: the same backbone, pyramid, anchors, RoI budgets, schedule and
evaluation) with PANet's bottom-up path, adaptive feature pooling, fully-connected fusion and
GroupNorm heads.

    make data
    instseg-jax train --config experiments/panet_nuclei.py --workdir runs/panet_nuclei

Choices, and why: the authors' "2fc" box head (FC1 per level, max, FC2, both with GroupNorm)
at Mask R-CNN's nuclei width of 512, where their default "4conv1fc" would run four 3x3
convolutions on each of the 1024 RoIs a step samples (about 1.4 s more per step on this CPU);
a 2-conv mask head as Mask R-CNN's here (conv1 per level and fused, conv2), with the FC branch
off the fused conv1; 1500 steps (cosine decay over them), which fit the hour at PANet's
~2.1 s step here (adaptive pooling runs the box head's first FC on four levels: about twice
Mask R-CNN's step); the mask predictor initialised as detectron2's (normal, std 0.001), as in
the measured run: the authors' MSRAFill over 1 + C maps is std 1.0 with one class, the size
their own code avoids for a one-map predictor (mask_rcnn_heads.py mask_rcnn_outputs).
Results: experiments/benchmarks/RESULTS.md, "PANet nuclei quality run".
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import panet


def get_config(arg=None):
    c = common.nuclei_detector(common.nuclei_experiment(panet.base_config(), arg))
    c.model.mask_head_convs = 2
    c.model.box_head = "2fc"
    c.schedule.total_steps = 1500
    c.model.mask_predictor_init = "normal"
    return common.finish(c, arg)
