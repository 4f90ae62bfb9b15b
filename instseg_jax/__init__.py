"""instseg_jax."""
