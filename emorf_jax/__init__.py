"""emorf_jax: receptive-field-regularised ResNets for music emotion and theme tagging (JAX/Flax)."""
