"""BlendMask on the real DSB 2018 nuclei set, sized for a 2-core CPU (the other nuclei
experiments' data, canvas, backbone and budget, so their figures compare).

    make data
    instseg-jax train --config experiments/blendmask_nuclei.py --workdir runs/blendmask_nuclei

Choices, and why: the FCOS nuclei experiment's detector (experiments/fcos_nuclei.py: sizes of
interest 32/64/128/256 for 5-47 px nuclei); the reference's bottom module (4 bases at stride 4,
64 x 64 on this canvas), 14 x 14 attentions and 56 x 56 blender; box-crop mask targets of 56
(input.mask_size: nuclei are at most 47 px on the canvas, so a larger crop adds nothing); up to
250 mask slots per image; 200 detection slots with COCOeval at maxDets 200 beside COCO's 100;
SGD lr 0.01 with 200 warmup steps and cosine decay over 2600 steps (a step takes about 1.07 s
here: sized to fit an hour with the evaluations), gradients clipped at global norm 10; val AP
every 500 steps, the best checkpoint kept in workdir/best.

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import blendmask


def get_config(arg=None):
    c = common.nuclei_experiment(blendmask.base_config(), arg)
    m = c.model
    m.sizes_of_interest = (32, 64, 128, 256)
    m.detections_per_image = 200
    c.input.mask_size = 56
    c.optim.lr = 0.01
    c.optim.weight_decay = 1e-4
    c.schedule.total_steps = 2600
    c.schedule.warmup_factor = 0.001
    return common.finish(c, arg)
