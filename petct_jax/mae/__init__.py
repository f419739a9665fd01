"""Masked-autoencoder pretraining pieces: block masks, imputation, reconstruction loss."""

from petct_jax.mae.loss import reconstruction_loss
from petct_jax.mae.masking import MaskToken, block_mask, impute
from petct_jax.mae.model import MaskedAutoencoder

__all__ = ["block_mask", "impute", "MaskToken", "MaskedAutoencoder", "reconstruction_loss"]
