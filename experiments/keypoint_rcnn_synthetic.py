"""Keypoint R-CNN on synthetic keypoint scenes, sized for a 2-core CPU: no download needed.

    instseg-jax train --config experiments/keypoint_rcnn_synthetic.py --workdir runs/kp_synth

The synthetic scenes (input/synthetic.py) of overlapping circles, rectangles and triangles,
each instance with 5 keypoints (input/keypoints.py "synthetic_shapes": the mean pixel of its
topmost row, leftmost and rightmost columns and bottom row, and its mass centre; a flip swaps
left and right), 512 training scenes and 64 held-out ones (another seed) on a 256x256 canvas at
batch 4; Mask R-CNN's nuclei-sized detector (ResNet-18 GroupNorm from scratch, 128-channel
FPN, anchors 16-256 px) with a 4-conv keypoint head of 256 channels; keypoint AP with OKS
sigma 0.05 per keypoint. `:smoke` shrinks everything for tests.
"""

from instseg_jax.configs import common
from instseg_jax.input.keypoints import SYNTHETIC_SHAPES
from instseg_jax.methods import keypoint_rcnn


def get_config(arg=None):
    c = common.synthetic_experiment(keypoint_rcnn.base_config())
    c.input.keypoints = "synthetic_shapes"
    m = c.model
    m.num_keypoints = SYNTHETIC_SHAPES.count
    m.keypoint_flip = SYNTHETIC_SHAPES.flip
    m.keypoint_head_convs = 4
    m.keypoint_head_dim = 256
    m.keypoint_fg_per_image = 16
    return common.finish(c, arg)
