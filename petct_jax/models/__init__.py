"""Backbones in Flax NNX, channels-last, with the semantics and weights of their PyTorch twins.

Build them by name through `petct_jax.models.registry.build(name, preset, rngs=..., **kw)`:
"plain_unet" (nnU-Net PlainConvUNet), "resenc_unet" (nnU-Net ResidualEncoderUNet, presets
M/L/XL), "swin_unetr" (MONAI SwinUNETR v2). The submodules import JAX; this package does not.

Every model has the same interface:
    model(x, deterministic=True)      (B, Z, Y, X, C_in) -> float32 logits (B, Z, Y, X, C_out)
                                      (a list, highest resolution first, with deep supervision)
    model.features(x)                 {"decoder": (B, Z, Y, X, F), "bottleneck": (B, z, y, x, Fb)}
    model.apply_head(features["decoder"])
    model.head                        the output head (what fine-tuning re-initialises)
    model.reinit_head(rngs, out_channels=None)
"""
