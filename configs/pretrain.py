"""MAE pretraining (method.md), big_vision style: `configs/pretrain.py:VARIANT`.

VARIANT is a comma-separated list of tokens, e.g. `plain_unet`, `swin_base,pet`,
`tiny,token`:
  backbone:  plain_unet (default, the paper's nnU-Net 6-stage 32..320), resenc_l,
             swin_small, swin_base, swin_large, tiny (a CPU-sized PlainConvUNet on
             small patches, for laptops, tests and the demo)
  modality:  joint (default: PET+CT, 2 channels), pet, ct (the separated-modality baseline)
  recipe:    paper (the reference's executed recipe: no warmup, 200 epochs of the store's
             scans counted when the run starts, no held-out validation scans; default: ours)
  ablations: token (learnable mask token instead of zero imputation), vw0 / vw1
             (visible_weight 0 or 1 instead of 0.2), shared_mask (one mask for both
             channels), ratio75 (mask ratio 0.75), block8 (8x8x8 blocks)
Every value can also be set with `--config.KEY=VALUE`.

Schedules are in steps: the paper's 200 epochs of 4,997 scans at batch 16 are about
62,500 steps (`total_steps` default), after `optim.warmup_steps` of linear warmup (ours; the
reference has none). With `epochs` > 0 the run instead takes that many passes over its
training scans, floor(scans / batch_size) steps each (the reference drops the last partial
batch), written to W/config.json when it starts (62,400 for 4,997 scans).
"""

import ml_collections

from petct_jax import config_blocks as blocks

ABLATIONS = ("token", "vw0", "vw1", "shared_mask", "ratio75", "block8")
FLAGS = ("paper",)
REFERENCE_EPOCHS = 200  # the reference's MAE pretraining: 200 epochs over every scan


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = blocks.variant_tokens(arg, blocks.BACKBONES, blocks.MODALITIES, ABLATIONS, FLAGS)
    backbone = next((t for t in tokens if t in blocks.BACKBONES), "plain_unet")
    modality = next((t for t in tokens if t in blocks.MODALITIES), "joint")
    name, preset, lr = blocks.BACKBONES[backbone]
    tiny = backbone == "tiny"
    paper = "paper" in tokens

    c = ml_collections.ConfigDict()
    c.task = "mae"
    c.variant = ",".join(tokens) or "plain_unet"
    c.store = ""  # the harmonized store (path or URL): `petct preprocess --out STORE`
    c.seed = 0
    c.total_steps = 400 if tiny else 62_500
    c.epochs = REFERENCE_EPOCHS if paper else 0  # > 0: total_steps from the training scans
    c.batch_size = 2 if tiny else 16  # global batch
    c.grad_accum = 1

    c.data = ml_collections.ConfigDict()
    c.data.channels = blocks.MODALITIES[modality]
    c.data.patch = (32, 32, 32) if tiny else (96, 128, 128)
    c.data.normalization = "zscore"  # the paper's per-scan z-score; or "nnunet"
    c.data.dtype = blocks.IMAGE_DTYPE
    c.data.zoom_prob = 0.5
    c.data.zoom_range = (0.9, 1.1)
    c.data.num_workers = 0 if tiny else 8
    # Held-out patients for the validation loss (never a test set); the reference pretrains on
    # every scan and keeps the epoch of lowest training loss.
    c.data.val_fraction = 0.0 if paper else 0.1
    c.data.exclude = ""  # a split JSON/CSV whose `test` cases are never pretrained on

    c.model = blocks.model(name, preset, tiny)

    c.mae = ml_collections.ConfigDict()
    c.mae.imputation = "token" if "token" in tokens else "zero"
    c.mae.visible_weight = 0.0 if "vw0" in tokens else 1.0 if "vw1" in tokens else 0.2
    c.mae.ratio = 0.75 if "ratio75" in tokens else 0.5
    c.mae.block = (8, 8, 8) if "block8" in tokens else (4, 4, 4) if tiny else (12, 16, 16)
    c.mae.per_channel = "shared_mask" not in tokens

    warmup = 0 if paper else 20 if tiny else 1_000
    c.optim = blocks.optim(lr=lr, warmup_steps=warmup, weight_decay=1e-5)
    c.mesh = blocks.mesh()
    c.ckpt = blocks.ckpt(every_steps=100 if tiny else 1_000)

    c.log_every = 10 if tiny else 50
    c.eval_every = 100 if tiny else 1_000
    c.eval_batches = 2 if tiny else 16
    c.preview_every = 100 if tiny else 2_000
    c.on_nonfinite = "stop"  # or "skip": keep the previous parameters and go on
    return c
