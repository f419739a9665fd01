"""petct-jax: whole-body FDG PET/CT foundation model in JAX/Flax.

Arrays are channels-last, (batch, z, y, x, channels); channel 0 = PET, channel 1 = CT.
"""

__version__ = "0.1.0"
