"""Mask R-CNN on the nuclei set split into three size classes: fine-tuning a one-class nuclei
detector to new classes, against the same budget from scratch (the figure of fine-tuning from a
detector, experiments/benchmarks/RESULTS.md).

    make data                                   # data/nuclei, then data/nuclei_sizes
    instseg-jax train --config experiments/maskrcnn_nuclei.py --workdir runs/nuclei \\
        --config.schedule.total_steps=500       # the one-class detector to start from
    instseg-jax train --config experiments/maskrcnn_nuclei_sizes.py --workdir runs/sizes_ft \\
        --config.model.init_from=runs/nuclei
    instseg-jax train --config experiments/maskrcnn_nuclei_sizes.py --workdir runs/sizes_scratch

The classes are "small", "medium" and "large" nuclei, cut at the terciles of the train split's
mask areas (data/prepare_nuclei_sizes.py), so a model must tell sizes apart as well as find
nuclei. The model is the nuclei experiment's (experiments/maskrcnn_nuclei.py): with
model.init_from, everything but the class-specific predictors (the box classifier and
regressor, the per-class mask logits) starts from the one-class detector. 300 steps at lr 0.02
after 50 warmup steps, val AP at the end; `:smoke` shrinks it for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import mask_rcnn


def get_config(arg=None):
    c = common.nuclei_detector(common.nuclei_experiment(mask_rcnn.base_config(), arg))
    c.model.mask_head_convs = 2
    c.input.train_split.annotations = "data/nuclei_sizes/annotations/train.json"
    c.input.eval_split.annotations = "data/nuclei_sizes/annotations/val.json"
    c.schedule.total_steps = 300
    c.schedule.warmup_steps = 50
    c.checkpoint.every_steps = 300
    c.eval.every_steps = 0 if arg else 300
    return common.finish(c, arg)
