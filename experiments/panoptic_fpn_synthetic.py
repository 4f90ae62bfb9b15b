"""Panoptic FPN on synthetic panoptic scenes, sized for a 2-core CPU: no download needed.

    instseg-jax train --config experiments/panoptic_fpn_synthetic.py --workdir runs/pfpn_synth

The synthetic scenes (input/synthetic.py) with stuff: overlapping circles, rectangles and
triangles (the things) over textured "sky" and "ground" bands (the stuff; the rest of the
background unlabelled), 512 training scenes and 64 held-out ones (another seed) on a 256x256
canvas at batch 4; Mask R-CNN's nuclei-sized detector (ResNet-18 GroupNorm from scratch,
128-channel FPN, anchors 16-256 px) with the semantic FPN head at 64 channels.
`:smoke` shrinks everything for tests.
"""

from instseg_jax import config as config_lib
from instseg_jax.methods import panoptic_fpn


def get_config(arg=None):
    c = panoptic_fpn.base_config()
    c.input.source = "synthetic"
    c.input.synthetic_stuff = True
    c.input.synthetic_length = 512
    c.input.synthetic_hw = (256, 256)
    c.input.synthetic_eval_seed = 1  # 64 held-out scenes
    c.input.synthetic_eval_length = 64
    c.input.canvas_hw = (256, 256)
    c.input.short_side = (256,)
    c.input.max_long_side = 256
    c.input.test_short_side = 256
    c.input.test_max_long_side = 256
    c.input.global_batch = 4
    c.input.mask_size = 28
    m = c.model
    m.depth = 18
    m.norm = "group_norm"
    m.freeze_at = 0
    m.fpn_channels = 128
    m.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
    m.rpn_pre_nms_topk_train = 1000
    m.rpn_post_nms_topk_train = 500
    m.rpn_pre_nms_topk_test = 500
    m.rpn_post_nms_topk_test = 300
    m.roi_batch_per_image = 128
    m.box_fc_dim = 512
    m.mask_fg_per_image = 16
    m.mask_head_convs = 2
    m.num_stuff_classes = 2
    m.semantic_channels = 64
    # The reference combines at the original image's pixels: 4096 px of a typical 640 x 480
    # COCO image is 1.3% of it; the same share of 256 x 256.
    m.combine_stuff_area = 4096.0 * 256 * 256 / (640 * 480)
    m.detections_per_image = 50
    c.optim.lr = 0.02
    c.optim.clip_norm = 10.0
    c.schedule.total_steps = 2000
    c.schedule.warmup_steps = 200
    c.schedule.decay = "cosine"
    c.schedule.steps = ()
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 500
    c.eval.global_batch = 8
    c.log_every = 10
    return config_lib.finish(c, arg)
