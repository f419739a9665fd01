"""petct-jax: whole-body FDG PET/CT foundation model in JAX/Flax.

Arrays are channels-last, (batch, z, y, x, channels); channel 0 = PET, channel 1 = CT.
"""

__version__ = "0.1.0"

# Before any JAX backend starts: XLA reads its flags once (petct_jax/xla_flags.py).
from petct_jax.xla_flags import prefer_eigen_convolutions as _prefer_eigen_convolutions  # noqa: E402

_prefer_eigen_convolutions()
