"""Panoptic FPN on synthetic panoptic scenes, sized for a 2-core CPU: no download needed.

    instseg-jax train --config experiments/panoptic_fpn_synthetic.py --workdir runs/pfpn_synth

The synthetic scenes (input/synthetic.py) with stuff: overlapping circles, rectangles and
triangles (the things) over textured "sky" and "ground" bands (the stuff; the rest of the
background unlabelled), 512 training scenes and 64 held-out ones (another seed) on a 256x256
canvas at batch 4; Mask R-CNN's nuclei-sized detector (ResNet-18 GroupNorm from scratch,
128-channel FPN, anchors 16-256 px) with the semantic FPN head at 64 channels.
`:smoke` shrinks everything for tests.
"""

from instseg_jax.configs import common
from instseg_jax.methods import panoptic_fpn


def get_config(arg=None):
    c = common.synthetic_experiment(panoptic_fpn.base_config())
    c.input.synthetic_stuff = True
    m = c.model
    m.mask_fg_per_image = 16
    m.mask_head_convs = 2
    m.num_stuff_classes = 2
    m.semantic_channels = 64
    # The reference combines at the original image's pixels: 4096 px of a typical 640 x 480
    # COCO image is 1.3% of it; the same share of 256 x 256.
    m.combine_stuff_area = 4096.0 * 256 * 256 / (640 * 480)
    return common.finish(c, arg)
