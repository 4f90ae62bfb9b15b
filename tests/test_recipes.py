"""The COCO recipes' training hyperparameters against the reference configuration files.

Each row is transcribed from the reference's own files (named in the row; detectron2's
`detectron2/config/defaults.py` supplies what a yaml leaves unset: SOLVER.MOMENTUM 0.9,
WEIGHT_DECAY 1e-4, WARMUP_FACTOR 1/1000, WARMUP_ITERS 1000, INPUT.MAX_SIZE_TRAIN 1333, no
gradient clipping), not from this package's configs, so a recipe edited away from its
reference fails here. Fields a reference leaves to its trainer's defaults are written out.
Steps are in iterations at the reference's batch of 16.
"""

from __future__ import annotations

import pytest

from instseg_jax import config as config_lib

DETECTRON2_1X = {
    "input.global_batch": 16,  # Base-RCNN-FPN.yaml SOLVER.IMS_PER_BATCH
    "optim.name": "sgd",
    "optim.lr": 0.02,  # Base-RCNN-FPN.yaml SOLVER.BASE_LR
    "optim.momentum": 0.9,
    "optim.weight_decay": 1e-4,
    "optim.clip_norm": 0.0,
    "schedule.warmup_steps": 1000,
    "schedule.warmup_factor": 1.0 / 1000,
    "schedule.total_steps": 90_000,  # SOLVER.MAX_ITER
    "schedule.steps": (60_000, 80_000),  # SOLVER.STEPS
    "input.short_side": (640, 672, 704, 736, 768, 800),  # INPUT.MIN_SIZE_TRAIN
    "input.max_long_side": 1333,
}

# detectron2's defaults.py: POOLER_SAMPLING_RATIO 0 for ROI_BOX_HEAD, ROI_MASK_HEAD and
# ROI_KEYPOINT_HEAD, RoIAlign's adaptive ceil(RoI side / pool size) samples per bin axis; no COCO
# yaml of the recipes below overrides it (PointRend's mask head pools by point sampling instead).
DETECTRON2_POOLERS = {"model.sampling_ratio": 0}

# detectron2's and PANet's mask targets rasterise COCO's polygons inside each RoI at 28 x 28
# (defaults.py INPUT.MASK_FORMAT "polygon": structures/masks.py rasterize_polygons_within_box;
# PANet lib/utils/segms.py polys_to_mask_wrt_box); ours pool a box crop, where the adaptive
# sampling ratio is the closest rule (measured: experiments/parity/mask_target_rules.py).
POLYGON_MASK_TARGETS = {"model.mask_target_sampling_ratio": 0}

# AdelaiDet's Base-FCOS.yaml, Base-CondInst.yaml and Base-BlendMask.yaml: batch 16, lr 0.01,
# the 1x steps, multi-scale 640..800; the rest from detectron2's defaults (no file sets a
# warmup factor: 1/1000).
ADELAIDET_1X = {**DETECTRON2_1X, "optim.lr": 0.01}

RECIPES = {
    # configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml over Base-RCNN-FPN.yaml.
    "maskrcnn_r50_fpn_coco_1x": {**DETECTRON2_1X, **DETECTRON2_POOLERS, **POLYGON_MASK_TARGETS},
    # configs/COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml over Base-Keypoint-RCNN-FPN.yaml:
    # ROI_BOX_HEAD.SMOOTH_L1_BETA 0.5 ("Keypoint AP degrades ... when using plain L1 loss"),
    # RPN.POST_NMS_TOPK_TRAIN 1500.
    "keypoint_rcnn_r50_fpn_coco_1x": {
        **DETECTRON2_1X,
        **DETECTRON2_POOLERS,
        "model.box_smooth_l1_beta": 0.5,
        "model.rpn_smooth_l1_beta": 0.0,
        "model.rpn_post_nms_topk_train": 1500,
    },
    # projects/PointRend/configs/InstanceSegmentation/pointrend_rcnn_R_50_FPN_1x_coco.yaml over
    # Base-PointRend-RCNN-FPN.yaml over Base-RCNN-FPN.yaml (no solver or input override).
    "pointrend_r50_fpn_coco_1x": {**DETECTRON2_1X, **DETECTRON2_POOLERS},
    # configs/COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml over Base-Panoptic-FPN.yaml.
    "panoptic_fpn_r50_coco_1x": {**DETECTRON2_1X, **DETECTRON2_POOLERS, **POLYGON_MASK_TARGETS},
    # AdelaiDet configs/FCOS-Detection/R_50_1x.yaml: INPUT.MIN_SIZE_TRAIN (800,);
    # adet/config/defaults.py FCOS.THRESH_WITH_CTR False, USE_SCALE True.
    "fcos_r50_fpn_coco_1x": {
        **ADELAIDET_1X,
        "input.short_side": (800,),
        "model.score_threshold_on": "class",
        "model.level_scales": True,
        "model.giou_smoothing": 1.0,  # adet/utils/comm.py compute_ious: (I + 1) / (U + 1)
        "model.clip_before_nms": False,  # NMS, then detector_postprocess clips
    },
    # AdelaiDet configs/CondInst/MS_R_50_1x.yaml over Base-CondInst.yaml (FCOS.THRESH_WITH_CTR
    # True; instances carry bitmasks, so centre sampling is about their mass centres).
    "condinst_r50_fpn_coco_1x": {
        **ADELAIDET_1X,
        "model.score_threshold_on": "product",
        "model.mass_centre_sampling": True,
        "model.level_scales": True,
        # adet/modeling/condinst/dynamic_mask_head.py: aligned_bilinear (adet/utils/comm.py)
        "model.mask_upsampling": "aligned",
        # fcos_outputs.py get_sample_region: m10 / m00 over integer pixel indices
        "model.mass_centre_convention": "pixel_index",
    },
    # AdelaiDet configs/BlendMask/R_50_1x.yaml over Base-BlendMask.yaml (FCOS.THRESH_WITH_CTR
    # True, USE_SCALE False; BASIS_MODULE.LOSS_ON True).
    "blendmask_r50_fpn_coco_1x": {
        **ADELAIDET_1X,
        "model.score_threshold_on": "product",
        "model.level_scales": False,
    },
    # ShuLiu1993/PANet configs/panet/e2e_panet_R-50-FPN_2x_mask.yaml over lib/core/config.py:
    # 8 GPUs x TRAIN.IMS_PER_BATCH 2, SOLVER.WARM_UP_ITERS 500 from WARM_UP_FACTOR 1/3, the
    # yaml's weight decay 1e-4 (the file's default is 5e-4); smooth-L1 beta 1/9 on the RPN
    # (lib/modeling/FPN.py), 1/3 on the box head (fast_rcnn_heads.py); RPN_STRADDLE_THRESH 0;
    # FAST_RCNN and MRCNN ROI_XFORM_SAMPLING_RATIO 2 in the yaml (config.py's default is 0);
    # SOLVER.BIAS_DOUBLE_LR True and BIAS_WEIGHT_DECAY False (config.py), applied by
    # tools/train_net_step.py's bias param group and lib/utils/net.py update_learning_rate.
    "panet_r50_fpn_coco_2x": {
        "input.global_batch": 16,
        "optim.name": "sgd",
        "optim.lr": 0.02,
        "optim.momentum": 0.9,
        "optim.weight_decay": 1e-4,
        "optim.bias_lr_multiplier": 2.0,
        "optim.bias_weight_decay_multiplier": 0.0,
        "optim.clip_norm": 0.0,
        "schedule.warmup_steps": 500,
        "schedule.warmup_factor": 1.0 / 3,
        "schedule.total_steps": 180_000,
        "schedule.steps": (120_000, 160_000),
        "input.short_side": (1200, 1200, 1000, 800, 600, 400),
        "input.max_long_side": 1400,
        "model.rpn_smooth_l1_beta": 1.0 / 9,
        "model.box_smooth_l1_beta": 1.0 / 3,
        "model.rpn_straddle_threshold": 0.0,
        "model.sampling_ratio": 2,
        **POLYGON_MASK_TARGETS,
    },
    # facebookresearch/Mask2Former configs/coco/instance-segmentation/
    # maskformer2_R50_bs16_50ep.yaml over Base-COCO-InstanceSegmentation.yaml: SOLVER (batch 16,
    # ADAMW, BASE_LR 1e-4, WEIGHT_DECAY 0.05, BACKBONE_MULTIPLIER 0.1, WARMUP_ITERS 10 at
    # WARMUP_FACTOR 1.0, MAX_ITER 368750, STEPS (327778, 355092), CLIP_GRADIENTS full_model
    # 0.01), INPUT coco_instance_lsj (IMAGE_SIZE 1024, MIN_SCALE 0.1, MAX_SCALE 2.0),
    # BACKBONE.FREEZE_AT 0; MASK_FORMER: 100 queries, DEC_LAYERS 10 (9 layers and the loss on the
    # learnable queries), CLASS/MASK/DICE_WEIGHT 2/5/5, NO_OBJECT_WEIGHT 0.1, TRAIN_NUM_POINTS
    # 12544, OVERSAMPLE_RATIO 3.0, IMPORTANCE_SAMPLE_RATIO 0.75, HIDDEN_DIM 256, NHEADS 8,
    # DIM_FEEDFORWARD 2048; SEM_SEG_HEAD: MSDeformAttnPixelDecoder, TRANSFORMER_ENC_LAYERS 6,
    # CONVS_DIM and MASK_DIM 256.
    "mask2former_r50_coco_50ep": {
        "input.global_batch": 16,
        "optim.name": "adamw",
        "optim.lr": 1e-4,
        "optim.weight_decay": 0.05,
        "optim.backbone_lr_multiplier": 0.1,
        "optim.clip_norm": 0.01,
        "schedule.warmup_steps": 10,
        "schedule.warmup_factor": 1.0,
        "schedule.total_steps": 368_750,
        "schedule.steps": (327_778, 355_092),
        "input.resize": "lsj",
        "input.canvas_hw": (1024, 1024),
        "input.lsj_scale": (0.1, 2.0),
        "input.hflip": 0.5,
        "model.freeze_at": 0,
        "model.num_queries": 100,
        "model.decoder_layers": 9,
        "model.deep_supervision": True,
        "model.class_weight": 2.0,
        "model.mask_weight": 5.0,
        "model.dice_weight": 5.0,
        "model.no_object_weight": 0.1,
        "model.train_points": 12544,
        "model.match_points": 12544,  # maskformer_model.py: the matcher's num_points too
        "model.oversample_ratio": 3.0,
        "model.importance_sample_ratio": 0.75,
        "model.hidden_dim": 256,
        "model.heads": 8,
        "model.decoder_feedforward": 2048,
        "model.pixel_decoder": "msdeform",
        "model.encoder_layers": 6,
        "model.conv_dim": 256,
        "model.mask_dim": 256,
    },
    # mmdetection configs/yolact/yolact_r50_1xb8-55e_coco.py: batch 8, SGD lr 1e-3, momentum 0.9,
    # weight decay 5e-4, LinearLR start_factor 0.1 over 500 iterations, 55 epochs with
    # MultiStepLR at 20, 42, 49 and 52 (14,658 iterations per epoch at batch 8), train_cfg
    # neg_pos_ratio 3, FilterAnnotations(min_gt_bbox_wh=(4.0, 4.0)); its loss_by_feat trains
    # every negative of an image without positives.
    "yolact_r50_coco": {
        "input.global_batch": 8,
        "optim.name": "sgd",
        "optim.lr": 1e-3,
        "optim.momentum": 0.9,
        "optim.weight_decay": 5e-4,
        "optim.clip_norm": 0.0,
        "schedule.warmup_steps": 500,
        "schedule.warmup_factor": 0.1,
        "schedule.total_steps": 55 * 14_658,
        "schedule.steps": tuple(e * 14_658 for e in (20, 42, 49, 52)),
        "model.negatives_per_positive": 3,
        "model.min_gt_box_size": 4.0,
        "model.negatives_without_positives": "all",
        # train_pipeline: Expand(ratio_range=(1, 4)), MinIoURandomCrop(min_ious=(0.1, 0.3, 0.5,
        # 0.7, 0.9), min_crop_size=0.3), PhotoMetricDistortion.
        "input.expand_ratio": (1.0, 4.0),
        "input.min_iou_crop": (0.1, 0.3, 0.5, 0.7, 0.9),
        "input.min_crop_size": 0.3,
        "input.photometric": True,
        # Resize(img_scale=(550, 550), keep_ratio=False) in the train and test pipelines.
        "input.resize": "stretch",
        "input.stretch_hw": (550, 550),
        # anchor_generator strides 550 / (69, 35, 18, 9, 5), centres at half a stride.
        "model.anchor_extent_hw": (550, 550),
    },
    # dbolya/yolact data/config.py yolact_plus_resnet50_config over yolact_base_config and
    # coco_base_config: batch 8 (train.py --batch_size default), lr 1e-3, momentum 0.9, decay
    # 5e-4, lr_warmup_init 1e-4 until 500, max_iter 800k, lr_steps (280k, 600k, 700k, 750k);
    # pred_scales 24..384 x 2^(j/3), pred_aspect_ratios (1, 1/2, 2) (w/h), resnet50_dcnv2_backbone
    # args ([3, 4, 6, 3], [0, 4, 6, 3]), maskiou_net five stride-2 3x3s, maskiou_alpha 25,
    # discard_mask_area 25, rescore_mask; MultiBoxLoss OHEM 3:1 (none without positives);
    # max_size 550 stretched; utils/augmentations.py RandomSampleCrop (0.1, 0.3, 0.7, 0.9, any).
    "yolact_plus_r50_coco": {
        "input.global_batch": 8,
        "optim.name": "sgd",
        "optim.lr": 1e-3,
        "optim.momentum": 0.9,
        "optim.weight_decay": 5e-4,
        "optim.clip_norm": 0.0,
        "schedule.warmup_steps": 500,
        "schedule.warmup_factor": 0.1,
        "schedule.total_steps": 800_000,
        "schedule.steps": (280_000, 600_000, 700_000, 750_000),
        "model.depth": 50,
        "model.anchor_sizes": (24, 48, 96, 192, 384),
        "model.anchor_scales": (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        "model.aspect_ratios": (1.0, 2.0, 0.5),
        "model.dcn_layers": (0, 4, 6, 3),
        "model.dcn_interval": 1,
        "model.maskiou_channels": (8, 16, 32, 64, 128),
        "model.maskiou_loss_weight": 25.0,
        "model.discard_mask_area": 25.0,
        "model.rescore_scores": True,
        "model.negatives_per_positive": 3,
        "model.negatives_without_positives": "none",
        "input.expand_ratio": (1.0, 4.0),
        "input.min_iou_crop": (0.1, 0.3, 0.7, 0.9),
        "input.min_crop_size": 0.3,
        "input.photometric": True,
        "input.resize": "stretch",
        "input.stretch_hw": (550, 550),
        "model.anchor_extent_hw": (550, 550),
    },
    # msracver/FCIS experiments/fcis/cfgs/resnet_v1_101_coco_fcis_end2end_ohem.yaml: 8 GPUs x
    # BATCH_IMAGES 1 with their gradients summed (train_end2end.py rescale_grad 1) at lr 0.0005
    # and wd 5e-4 (x 8 and / 8 for losses averaged over the batch), momentum 0.9, 8 epochs with
    # lr_step 5.33, warmup 250 steps at 0.00005, SCALES (600, 1000); ResNet-101 res5 dilated;
    # RPN 6000 -> 300 at 0.7, allowed border 0; BATCH_ROIS_OHEM 128, LOSS_WEIGHT (1, 10, 1),
    # BBOX_STDS (0.2, 0.2, 0.5, 0.5), MASK_SIZE 21 from 7 x 7 groups, BINARY_THRESH 0.4;
    # TEST.ITER 2, NMS 0.3, USE_MASK_MERGE at 0.5 (config.py's MASK_MERGE_THRESH).
    "fcis_r101_coco": {
        "input.global_batch": 8,
        "input.short_side": (600,),
        "input.max_long_side": 1000,
        "input.test_short_side": 600,
        "input.test_max_long_side": 1000,
        "optim.name": "sgd",
        "optim.lr": 0.004,
        "optim.momentum": 0.9,
        "optim.weight_decay": 6.25e-5,
        "schedule.warmup_steps": 250,
        "schedule.warmup_factor": 0.1,
        "schedule.total_steps": 118_000,
        "schedule.steps": (78_600,),
        "model.depth": 101,
        "model.res5_dilation": 2,
        "model.norm": "frozen_bn",
        "model.freeze_at": 2,
        "model.anchor_sizes": (64.0, 128.0, 256.0, 512.0),
        "model.rpn_pre_nms_topk_train": 6000,
        "model.rpn_post_nms_topk_train": 300,
        "model.rpn_nms_threshold": 0.7,
        "model.rpn_straddle_threshold": 0.0,
        "model.ohem_rois": 128,
        "model.cls_loss_weight": 1.0,
        "model.mask_loss_weight": 10.0,
        "model.box_loss_weight": 1.0,
        "model.box_weights": (5.0, 5.0, 2.0, 2.0),
        "model.ps_group_size": 7,
        "model.mask_size": 21,
        "model.mask_threshold": 0.4,
        "model.test_box_refinement": True,
        "model.test_nms_threshold": 0.3,
        "model.test_mask_voting": True,  # USE_MASK_MERGE, MASK_MERGE_THRESH, BINARY_THRESH
        "model.test_mask_merge_threshold": 0.5,
        "model.test_mask_binary_threshold": 0.4,
        "model.compute_dtype": "bfloat16",
    },
    # xieenze/PolarMask configs/polarmask/4gpu/polar_768_1x_r50.py: 4 GPUs x imgs_per_gpu 4,
    # SGD lr 0.01, momentum 0.9, weight decay 1e-4, grad_clip max_norm 35, linear warmup 500
    # iterations from warmup_ratio 1/3, 12 epochs with steps at 8 and 11 (7330 iterations per
    # epoch at batch 16), img_scale (1280, 768), test_cfg nms_pre 1000, score_thr 0.05, nms
    # iou_thr 0.5, max_per_img 100; mmdet/models/anchor_heads/polarmask_head.py: three towers
    # (a box branch whose boxes NMS uses: mask_nms False), class x (centerness + 0.5), boxes
    # clipped before NMS (distance2bbox max_shape); mmdet/datasets/coco_seg.py: small
    # instances dropped, centre sampling radius 1.5 about the mass centre.
    "polarmask_r50_fpn_coco_1x": {
        "input.global_batch": 16,
        "optim.name": "sgd",
        "optim.lr": 0.01,
        "optim.momentum": 0.9,
        "optim.weight_decay": 1e-4,
        "optim.clip_norm": 35.0,
        "schedule.warmup_steps": 500,
        "schedule.warmup_factor": 1.0 / 3,
        "schedule.total_steps": 12 * 7330,
        "schedule.steps": (8 * 7330, 11 * 7330),
        # img_scale=(1280, 768) (w, h), resize_keep_ratio=False, train and test; the canvas
        # is that size (128, the coarsest stride, divides both sides).
        "input.resize": "stretch",
        "input.stretch_hw": (768, 1280),
        "input.canvas_hw": (768, 1280),
        "input.instance_filter": "coco_seg",
        "optim.bias_lr_multiplier": 2.0,  # paramwise_options bias_lr_mult
        "optim.bias_weight_decay_multiplier": 0.0,  # bias_decay_mult
        "model.candidates_per_level": 1000,
        "model.score_threshold": 0.05,
        "model.score_threshold_on": "class",
        "model.nms_threshold": 0.5,
        "model.detections_per_image": 100,
        "model.detection_score": "product",
        "model.centerness_score_offset": 0.5,
        "model.box_branch": True,
        "model.clip_before_nms": True,
        "model.center_sampling_radius": 1.5,
        "model.ray_rule": "reference",
    },
    # mmdetection configs/solov2/solov2_r50_fpn_1x_coco.py (optim_wrapper lr 0.01, clip_grad
    # max_norm 35) over _base_/schedules/schedule_1x.py (SGD momentum 0.9, weight decay 1e-4,
    # LinearLR start_factor 0.001 over 500 iterations, 12 epochs, MultiStepLR at 8 and 11) and
    # its pipeline's single scale (1333, 800). Epochs are 7330 iterations at batch 16.
    # WXinlong/SOLO solov2_head.py: the grids span the padded input (one image at test), and
    # get_seg_single keeps nms_pre 500 after maskness (configs/solov2/solov2_r50_fpn_8gpu_1x.py
    # test_cfg).
    "solov2_r50_fpn_coco_1x": {
        "model.grid_extent": "image",
        "model.nms_pre": 500,
        "input.global_batch": 16,
        "optim.name": "sgd",
        "optim.lr": 0.01,
        "optim.momentum": 0.9,
        "optim.weight_decay": 1e-4,
        "optim.clip_norm": 35.0,
        "schedule.warmup_steps": 500,
        "schedule.warmup_factor": 0.001,
        "input.short_side": (800,),
        "input.max_long_side": 1333,
    },
    # mmdetection configs/solo/solo_r50_fpn_1x_coco.py (optim_wrapper lr 0.01, no clip_grad;
    # mask_head stacked_convs 7, feat_channels 256, pos_scale 0.2, DiceLoss loss_weight 3.0) over
    # _base_/schedules/schedule_1x.py, and decoupled-solo_r50_fpn_1x_coco.py over it.
    **{
        name: {
            "model.mask_branch": branch,
            "model.grid_extent": "image",
            "model.head_convs": 7,
            "model.head_channels": 256,
            "model.center_scale": 0.2,
            "model.mask_loss_weight": 3.0,
            "model.nms_pre": 500,
            "input.global_batch": 16,
            "optim.name": "sgd",
            "optim.lr": 0.01,
            "optim.momentum": 0.9,
            "optim.weight_decay": 1e-4,
            "optim.clip_norm": 0.0,
            "schedule.warmup_steps": 500,
            "schedule.warmup_factor": 0.001,
            "input.short_side": (800,),
            "input.max_long_side": 1333,
        }
        for name, branch in (
            ("solo_r50_fpn_coco_1x", "vanilla"),
            ("solo_decoupled_r50_fpn_coco_1x", "decoupled"),
        )
    },
    # mmdetection configs/ms_rcnn/ms-rcnn_r50-caffe_fpn_1x_coco.py over mask_rcnn/
    # mask-rcnn_r50-caffe_fpn_1x_coco.py, _base_/schedules/schedule_1x.py (SGD lr 0.02, momentum
    # 0.9, weight decay 1e-4, LinearLR start_factor 0.001 over 500 iterations, 12 epochs with
    # milestones 8 and 11), _base_/datasets/coco_instance.py (batch 2 x 8 GPUs, Resize scale
    # (1333, 800) keep_ratio), _base_/models/mask-rcnn_r50_fpn.py (RoIAlign sampling_ratio 0;
    # RPN losses over avg_factor, the anchors sampled); MaskIoUHead's defaults.
    "ms_rcnn_r50_fpn_coco_1x": {
        "input.global_batch": 16,
        "optim.name": "sgd",
        "optim.lr": 0.02,
        "optim.momentum": 0.9,
        "optim.weight_decay": 1e-4,
        "optim.clip_norm": 0.0,
        "schedule.warmup_steps": 500,
        "schedule.warmup_factor": 0.001,
        "schedule.total_steps": 12 * 7330,
        "schedule.steps": (8 * 7330, 11 * 7330),
        "input.short_side": (800,),
        "input.max_long_side": 1333,
        "model.sampling_ratio": 0,
        "model.rpn_loss_normalizer": "sampled",
        "model.maskiou_num_convs": 4,
        "model.maskiou_conv_dim": 256,
        "model.maskiou_num_fcs": 2,
        "model.maskiou_fc_dim": 1024,
        "model.maskiou_logit_threshold": 0.5,  # train_cfg.rcnn.mask_thr_binary
        "model.maskiou_loss_weight": 0.5,  # loss_iou MSELoss loss_weight
    },
    # InstanceFCN has no released code: its paper's section 4 (arXiv 1603.08678), the head and
    # the training samples (k = 5, m = 21 at stride 8, 512-d branches, 256 windows at 1 : 1,
    # DeepMask's canonical object 128 / 224 of the window).
    "instancefcn_r50_coco": {
        "model.grid_k": 5,
        "model.window_cells": (21, 15),
        "model.branch_channels": 512,
        "model.windows_per_image": 256,
        "model.positive_fraction": 0.5,
        "model.canonical_object": 128 / 224,
        "input.global_batch": 16,
    },
    # facebookresearch/deepmask: train.lua's options (-iSz 160 -oSz 56 -gSz 112 -shift 16
    # -scale .25 -hfreq .5 -momentum .9 -wd 5e-4), TrainerDeepMask.lua's first lr regime (1e-3),
    # DataSampler.lua's objSz = ceil(iSz 128 / 224), DeepMask.lua's trunk (ResNet-50 to res4),
    # evalPerImage.lua's scales (-smin -2.5 -smax .5 -sstep .5) and mask threshold (-thr .2).
    "deepmask_r50_coco": {
        "model.depth": 50,
        "model.trunk_level": "res4",
        "model.window_inner": 160,
        "model.object_size": 92,
        "model.mask_size": 56,
        "model.mask_target_size": 112,
        "model.shift": 16.0,
        "model.scale_jitter": 0.25,
        "model.positive_fraction": 0.5,
        "model.scale_negative_fraction": 0.0,
        "model.test_scales": (-2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5),
        "model.mask_threshold": 0.2,
        "optim.name": "sgd",
        "optim.lr": 1e-3,
        "optim.momentum": 0.9,
        "optim.weight_decay": 5e-4,
    },
    # wangsr126/RDSNet configs/rdsnet/rdsnet_r50_fpn_1x.py (imgs_per_gpu 2 on 8 GPUs, the
    # README's 90k iterations; lr_config warmup 'linear' 500 iterations at ratio 1/3, steps at
    # epochs 8 and 11 of 12; grad_clip max_norm 35; Resize (1333, 800); train_cfg crop padding
    # 0.25, test_cfg crop padding 0.1 and mask_thr_binary 0.4, masks_to_train 100,
    # pos_neg_ratio 1; RdsRetinaHead octave_base_scale 4, scales_per_octave 3, SmoothL1 beta 0.11;
    # rdsnet_refine_r50_fpn_1x.py's mbrm_cfg gamma 0.05).
    "rdsnet_r50_fpn_coco_1x": {
        "input.global_batch": 16,
        "optim.name": "sgd",
        "optim.lr": 0.005,
        "optim.momentum": 0.9,
        "optim.weight_decay": 1e-4,
        "optim.clip_norm": 35.0,
        "schedule.warmup_steps": 500,
        "schedule.warmup_factor": 1.0 / 3,
        "schedule.total_steps": 12 * 7330,
        "schedule.steps": (8 * 7330, 11 * 7330),
        "input.short_side": (800,),
        "input.max_long_side": 1333,
        "model.train_crop_padding": 0.25,
        "model.test_crop_padding": 0.1,
        "model.mask_threshold": 0.4,
        "model.masks_per_image": 100,
        "model.mask_negatives_per_positive": 1.0,
        "model.anchor_octave_base": 4.0,
        "model.scales_per_octave": 3,
        "model.box_smooth_l1_beta": 0.11,
        "model.positive_iou": 0.5,
        "model.negative_iou": 0.4,
        "model.mbrm": True,
        "model.mbrm_gamma": 0.05,
    },
}


def _field(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_coco_recipe_trains_as_its_reference_file(recipe):
    """Fails when a recipe's batch, optimiser, clipping, warmup, schedule or training scales
    differ from the reference file's (e.g. FCOS's former warmup from lr / 3, which is
    maskrcnn-benchmark's default, not AdelaiDet's; SOLOv2 without its gradient clipping)."""
    config = config_lib.load(f"experiments/{recipe}.py")
    wrong = {}
    for field, want in RECIPES[recipe].items():
        got = _field(config, field)
        same = got == pytest.approx(want) if isinstance(want, float) else got == want
        if not same:
            wrong[field] = (got, want)
    assert not wrong, f"{recipe}: (ours, reference) {wrong}"


def test_torchvision_preset_keeps_torchvision_sampling_ratio():
    """torchvision's maskrcnn_resnet50_fpn pools with MultiScaleRoIAlign(sampling_ratio=2)
    (torchvision/models/detection/mask_rcnn.py, faster_rcnn.py): an imported model keeps 2 even
    when its config starts from a recipe that uses detectron2's adaptive 0."""
    from instseg_jax.weights import torchvision as torchvision_weights

    config = config_lib.load("experiments/maskrcnn_r50_fpn_coco_1x.py")
    assert config.model.sampling_ratio == 0
    torchvision_weights.apply_preset(config)
    assert config.model.sampling_ratio == 2
