"""YOLACT on the real DSB 2018 nuclei set, sized for a 2-core CPU (the Mask R-CNN and SOLOv2
nuclei experiments' data, canvas, backbone and budget, so the three compare).

    make data
    instseg-jax train --config experiments/yolact_nuclei.py --workdir runs/yolact_nuclei

Choices, and why: the 256x256 canvas, ResNet-18 with GroupNorm from scratch and a 128-channel
pyramid (P3..P7 here); anchors of 8..128 px (the reference's 24..384 px are for COCO objects on
a 550 px input; nuclei are 5-47 px, sqrt of box area on the canvas, 1st-99th percentile), so
the smallest nuclei still reach IoU 0.5 with some anchor; 32 prototypes of 128 channels; up to
100 mask slots per image (the reference's) and 200 detection slots with COCOeval at maxDets 200
beside COCO's 100 (up to 101 nuclei in a val image); SGD lr 0.01 (the reference's 1e-3 is for
ImageNet-initialised weights) with 200 warmup steps and cosine decay over 5500 steps (0.56 s each here: with
eleven evaluations they fit in under an hour), gradients
clipped at global
norm 10; val AP every 500 steps, the best checkpoint kept in workdir/best.

`:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax import config as config_lib
from instseg_jax.methods import yolact


def get_config(arg=None):
    c = yolact.base_config()
    c.input.source = "coco"
    c.input.train_split.annotations = "data/nuclei/annotations/train.json"
    c.input.train_split.images = "data/nuclei/images"
    c.input.eval_split.annotations = "data/nuclei/annotations/val.json"
    c.input.eval_split.images = "data/nuclei/images"
    c.input.canvas_hw = (256, 256)
    c.input.global_batch = 4
    c.input.num_workers = 1
    c.input.max_instances = 128
    c.input.short_side = (224, 256)
    c.input.max_long_side = 256
    c.input.test_short_side = 256
    c.input.test_max_long_side = 256
    m = c.model
    m.depth = 18
    m.width = 64
    m.norm = "group_norm"
    m.freeze_at = 0
    m.fpn_channels = 128
    m.anchor_sizes = (8, 16, 32, 64, 128)
    m.proto_channels = 128
    m.detections_per_image = 200
    c.eval.max_detections = 200
    c.optim.lr = 0.01
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 10.0
    c.schedule.total_steps = 5500
    c.schedule.warmup_steps = 200
    c.schedule.warmup_factor = 0.001
    c.schedule.decay = "cosine"
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 0 if arg else 500
    c.log_every = 10
    return config_lib.finish(c, arg)
