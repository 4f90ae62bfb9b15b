"""instseg_jax: instance segmentation in JAX/Flax with static shapes.

The core never imports TensorFlow or torch: `instseg_jax.ops` needs only jax and numpy.
"""

__version__ = "0.1.0"
