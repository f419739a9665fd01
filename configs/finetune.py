"""Lesion-segmentation fine-tuning (method.md, downstream), big_vision style:
`configs/finetune.py:VARIANT`.

VARIANT is a comma-separated list of tokens, e.g. `plain_unet,frac10`, `swin_base,scratch`,
`tiny`:
  backbone:  plain_unet (default, the paper's nnU-Net 6-stage 32..320), resenc_l,
             swin_small, swin_base, swin_large, tiny (the CPU-sized PlainConvUNet of
             `configs/pretrain.py:tiny`, so a tiny MAE run initialises it)
  recipe:    paper (the reference's executed recipe, below; default: ours)
  labels:    frac10, frac30, frac100 (default): share of the training pool's scans that
             carry labels, whole patients (`data.label_fraction`). They do not change the
             step count: with our recipe every fraction trains `total_steps` (the 100%
             budget; `petct study` scales it per fraction), so standalone add
             `--config.epochs=100` to train 100 epochs of the labelled scans as the reference.
             A split CSV that already encodes a fraction (the reference's
             autopet_seg_split_10pct.csv) is read with 100% of its rows: a fraction below 1
             on top of it is refused.
  init:      scratch (random initialisation; otherwise set --config.init=MAE_RUN_DIR or a
             `petct convert` output directory)
  modality:  joint (default: PET+CT), pet, ct (fine-tune a single-modality model)
  loss:      ds (deep supervision, CNN backbones), batch_dice
Every value can also be set with `--config.KEY=VALUE`.

Schedules: `total_steps` (17,500 = the reference's 100 epochs over 700 scans at batch 4),
or with `epochs` > 0 that many passes over the labelled training scans, counted when the run
starts (ceil(scans / batch_size) steps each, written to W/config.json). Checkpoints are
selected by the validation loss (Dice + CE on fixed patches of the validation split,
`data.val_fraction` of the patients), never on the test split, which is scored once after
training (`W/test/`); without a validation split the final checkpoint is scored
(`checkpoint_rule` in W/test/summary.json).

`paper` (docs/recipes.md has both recipes side by side): the MAE's output head is loaded too
(`init_head`), plain random crops with no lesion oversampling and no augmentation, 100 epochs
of the labelled scans (`epochs`), no validation split (the reference has none: the final
checkpoint is scored), constant-weight sliding windows; AdamW + cosine without warmup and the
loss are ours already.
"""

import ml_collections

from petct_jax import config_blocks as blocks

FRACTIONS = {"frac10": 0.1, "frac30": 0.3, "frac100": 1.0}
FLAGS = ("scratch", "ds", "batch_dice", "paper")
REFERENCE_EPOCHS = 100  # the reference's fine-tuning: 100 epochs over the labelled scans


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = blocks.variant_tokens(arg, blocks.BACKBONES, blocks.MODALITIES, FRACTIONS, FLAGS)
    backbone = next((t for t in tokens if t in blocks.BACKBONES), "plain_unet")
    modality = next((t for t in tokens if t in blocks.MODALITIES), "joint")
    fraction = FRACTIONS[next((t for t in tokens if t in FRACTIONS), "frac100")]
    name, preset, lr = blocks.BACKBONES[backbone]
    tiny = backbone == "tiny"
    paper = "paper" in tokens

    c = ml_collections.ConfigDict()
    c.task = "seg"
    c.variant = ",".join(tokens) or "plain_unet"
    c.store = ""  # the harmonized store with labels (`petct preprocess --out STORE`)
    # Weights to start from: an MAE run directory (`petct pretrain --workdir`), a directory
    # written by `petct convert torch2jax`, or "scratch". Encoder and decoder are loaded; the
    # output head is re-initialised unless `init_head` (the reference loads it: an MAE's
    # 2-channel reconstruction head has the shape of the 2-class segmentation head).
    c.init = "scratch" if "scratch" in tokens else ""
    c.init_head = paper
    # weights trained on another harmonization preset than the store's are refused unless this
    c.allow_preset_mismatch = False
    c.init_which = "best"  # checkpoint of an init run: "best" (validation loss), "latest", or a step
    c.seed = 0
    c.total_steps = 400 if tiny else 17_500
    c.epochs = REFERENCE_EPOCHS if paper else 0  # > 0: total_steps from the labelled scans
    c.batch_size = 2 if tiny else 4  # global batch
    c.grad_accum = 1

    c.data = blocks.seg_data(blocks.MODALITIES[modality], tiny)
    c.data.label_fraction = fraction  # of the training pool's scans, whole patients
    c.data.label_seed = 0

    c.model = blocks.model(name, preset, tiny)
    c.loss = blocks.seg_loss(batch_dice="batch_dice" in tokens, deep_supervision="ds" in tokens)
    # The reference: plain cosine, no warmup (the tiny CPU runs of our recipe warm up briefly).
    c.optim = blocks.optim(lr=lr, warmup_steps=10 if tiny and not paper else 0, weight_decay=1e-5)
    c.mesh = blocks.mesh()
    c.ckpt = blocks.ckpt(every_steps=100 if tiny else 500)
    c.eval = blocks.seg_eval(tiny)
    if paper:
        c.data.foreground_fraction = 0.0  # MONAI RandSpatialCropd: anywhere in the scan
        c.data.augment = blocks.no_augmentation()
        c.data.val_fraction = 0.0  # the reference holds out its test scans only
        c.eval.window_weights = "constant"  # MONAI sliding_window_inference's default

    c.log_every = 10 if tiny else 50
    c.eval_every = 100 if tiny else 500
    c.eval_batches = 2 if tiny else 16
    c.preview_every = 100 if tiny else 2_000
    c.on_nonfinite = "stop"
    return c
