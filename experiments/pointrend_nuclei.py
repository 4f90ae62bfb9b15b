"""PointRend on the real DSB 2018 nuclei set, sized for a 2-core CPU: Mask R-CNN's nuclei
experiment (experiments/maskrcnn_nuclei.py: the same backbone, pyramid, anchors, RoI budgets,
schedule and evaluation) with the mask head replaced by PointRend's coarse and point heads.

    make data
    instseg-jax train --config experiments/pointrend_nuclei.py --workdir runs/pointrend_nuclei

Choices, and why: the coarse head's convolution at the pyramid's 128 channels and 2 FC x 512
(the box head's width here; detectron2's 256 and 1024 are sized for COCO's 80 classes);
detectron2's point head (3 FC x 256), 196 training points per RoI and 224x224 inference masks
by adaptive subdivision; the same 2000 steps as Mask R-CNN's figure so the two compare at one
budget. Results: experiments/benchmarks/RESULTS.md, "PointRend nuclei quality run".
`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import pointrend


def get_config(arg=None):
    c = common.nuclei_experiment(pointrend.base_config(), arg)
    c = common.nuclei_detector(c)
    c.model.coarse_conv_dim = 128
    c.model.coarse_fc_dim = 512
    return common.finish(c, arg)
