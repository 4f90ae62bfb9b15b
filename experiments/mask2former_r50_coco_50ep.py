"""Mask2Former R50 on COCO 2017 instance segmentation, 50 epochs (facebookresearch/Mask2Former
configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml), for GPU/TPU users (not
trained here; tests compile it and run one step at 1024 x 1024 on the CPU).

    instseg-jax train --config experiments/mask2former_r50_coco_50ep.py --workdir runs/m2f \
        --config.input.train_split.annotations=COCO_ROOT/annotations/instances_train2017.json \
        --config.input.train_split.images=COCO_ROOT/train2017 \
        --config.model.backbone_weights=resnet50-0676ba61.pth

resnet50-0676ba61.pth is torchvision's ImageNet ResNet-50 (ResNet50_Weights.IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth), fetched once where there is internet
(docs/getting_started.md, "Pretrained backbones"); without it training refuses to start: a
FrozenBN ResNet needs those weights.

The reference's settings (instseg_jax/methods/mask2former.py base_config): batch 16 of 1024 x
1024 large-scale-jitter crops (scale 0.1-2.0, horizontal flips), AdamW lr 1e-4 with weight decay
0.05 (none on norms and embeddings) and the backbone at lr x 0.1, 10 warmup steps, 368,750 steps
with x0.1 decays at 327,778 and 355,092, the whole model's gradient clipped at norm 0.01; a
FrozenBN ResNet-50 with every stage trained, from ImageNet weights (the command above); MSDeformAttn pixel decoder (6 layers), 9 masked-attention decoder layers, 100
queries; losses 2 x class + 5 x BCE + 5 x dice on 12,544 importance-sampled points, deep
supervision. The Mask2Former paper (Table 2) reports 43.7 mask AP on COCO val2017 for this
setting; this file has not reproduced it. Test images are resized to short side 800 with the
long side at most 1024 (the reference allows 1333).

`:maskformer` switches to the MaskFormer variant (FPN per-pixel decoder, 6 DETR decoder layers
with full cross-attention to res5). `:smoke` shrinks everything to synthetic scenes for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import mask2former


def get_config(arg=None):
    c = mask2former.base_config()
    c.input.train_split.annotations = "data/coco/annotations/instances_train2017.json"
    c.input.train_split.images = "data/coco/train2017"
    c.input.eval_split.annotations = "data/coco/annotations/instances_val2017.json"
    c.input.eval_split.images = "data/coco/val2017"
    if arg == "maskformer":
        mask2former.maskformer(c)
        arg = None
    return common.accelerator_recipe(c, arg)
