"""Recipes the experiment files share (as big_vision's configs/common.py): the nuclei and
synthetic-scene set-ups that make the methods' figures compare, Mask R-CNN's nuclei detector for
the methods built on it, the accelerator step of the COCO recipes, and `finish`, every
experiment's last step. Above `methods/` in the layers: `finish` asks the method for its
`smoke` shrink."""

from __future__ import annotations

import ml_collections

from instseg_jax import config as config_lib
from instseg_jax import methods


def nuclei_experiment(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """What every method's nuclei experiment shares, so their figures compare: the prepared
    DSB 2018 nuclei set (`make data`) on a 256x256 canvas at batch 4, a ResNet-18 with GroupNorm
    trained from scratch under a 128-channel pyramid, 200 warmup steps then cosine decay with
    gradients clipped at norm 10, and val AP every 500 steps (COCOeval at maxDets 200 beside
    COCO's 100: up to 101 nuclei in a val image). The experiment sets its method's fields, the
    learning rate and the number of steps."""
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
    c.input.test_short_side = 256  # the canvas holds every val image at 256 (largest fits)
    c.input.test_max_long_side = 256
    c.model.depth = 18
    c.model.width = 64
    c.model.norm = "group_norm"
    c.model.freeze_at = 0
    if "fpn_channels" in c.model:  # methods with an FPN
        c.model.fpn_channels = 128
    if "loss_normaliser_images" in c.model:  # SOLOv2, CondInst: the COCO recipe's is per GPU
        c.model.loss_normaliser_images = 0  # one normaliser over the batch of 4, as measured
    c.eval.max_detections = 200
    # From-scratch GroupNorm at lr 0.02 spiked to grad norm 45, then NaN, without clipping.
    c.optim.clip_norm = 10.0
    c.schedule.warmup_steps = 200
    c.schedule.decay = "cosine"
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 0 if arg else 500  # AP on the val split during the full run
    c.log_every = 10
    return c


def nuclei_detector(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Mask R-CNN's detector for the nuclei set (experiments/maskrcnn_nuclei.py says why),
    shared by the nuclei experiments of the methods built on it so that they compare: 56x56
    mask targets, anchors 8-128 px, 1000/500 proposals, 256 RoIs per image of which up to 32
    train the mask head, a 512-wide box head, 200 detection slots (up to 101 nuclei per val
    image), lr 0.02 over 2000 steps. Call after nuclei_experiment."""
    c.input.mask_size = 56
    m = c.model
    m.anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
    m.rpn_pre_nms_topk_train = 1000
    m.rpn_post_nms_topk_train = 500
    m.rpn_pre_nms_topk_test = 1000
    m.rpn_post_nms_topk_test = 500
    m.roi_batch_per_image = 256
    m.mask_fg_per_image = 32
    m.box_fc_dim = 512
    m.detections_per_image = 200
    c.optim.lr = 0.02
    c.schedule.total_steps = 2000
    return c


def synthetic_experiment(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """What the two-stage methods' experiments on synthetic scenes share (keypoint and
    panoptic scenes: no download): 512 training scenes and 64 held-out ones (seed 1) on a
    256x256 canvas at batch 4, Mask R-CNN's nuclei-sized detector (ResNet-18 GroupNorm from
    scratch, 128-channel FPN, anchors 16-256 px, 128 RoIs per image, 512-wide box head, 50
    detections per image), lr 0.02 with 200 warmup steps then cosine decay over 2000 steps,
    gradients clipped at norm 10, evaluation every 500 steps. The experiment sets its head's
    fields."""
    c.input.source = "synthetic"
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
    return c


def accelerator_recipe(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """The last step of a COCO recipe (for GPUs and TPUs): bfloat16 compute with float32
    parameters and optimizer state (detectron2 and mmdetection train in AMP, TF Model Garden in
    bfloat16 on TPU; losses, box decoding and NMS stay float32 in the model), then `finish`."""
    c.model.compute_dtype = "bfloat16"
    return finish(c, arg)


def finish(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """An experiment's last step: apply its argument (only `smoke` so far) and lock."""
    if arg == "smoke":
        c = methods.get(c.method).smoke(c)
    elif arg:
        raise config_lib.ConfigValueError(
            f"unknown experiment argument {arg!r}; use 'smoke' or nothing"
        )
    c.lock()
    return c
