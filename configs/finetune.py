"""Lesion-segmentation fine-tuning (method.md, downstream), big_vision style:
`configs/finetune.py:VARIANT`.

VARIANT is a comma-separated list of tokens, e.g. `plain_unet,frac10`, `swin_base,scratch`,
`tiny`:
  backbone:  plain_unet (default, the paper's nnU-Net 6-stage 32..320), resenc_l,
             swin_small, swin_base, swin_large, tiny (the CPU-sized PlainConvUNet of
             `configs/pretrain.py:tiny`, so a tiny MAE run initialises it)
  labels:    frac10, frac30, frac100 (default): share of the training pool's scans that
             carry labels, whole patients (`data.label_fraction`)
  init:      scratch (random initialisation; otherwise set --config.init=MAE_RUN_DIR or a
             `petct convert` output directory)
  modality:  joint (default: PET+CT), pet, ct (fine-tune a single-modality model)
  loss:      ds (deep supervision, CNN backbones), batch_dice
Every value can also be set with `--config.KEY=VALUE`.

Schedules are in steps: the reference's 100 epochs over 700 scans at batch 4 are
17,500 steps (`total_steps`). Checkpoints are selected by the validation loss (Dice + CE
on fixed patches of the validation split, `data.val_fraction` of the patients), never on
the test split, which is scored once after training (`W/test/`).
"""

import ml_collections

BACKBONES = {
    # name: (model.name, model.preset, lr)
    "plain_unet": ("plain_unet", "paper", 5e-4),
    "resenc_l": ("resenc_unet", "L", 5e-4),
    "swin_small": ("swin_unetr", "small", 1e-4),
    "swin_base": ("swin_unetr", "base", 1e-4),
    "swin_large": ("swin_unetr", "large", 1e-4),
    "tiny": ("plain_unet", "paper", 2e-3),
}
MODALITIES = {"joint": ("pet", "ct"), "pet": ("pet",), "ct": ("ct",)}
FRACTIONS = {"frac10": 0.1, "frac30": 0.3, "frac100": 1.0}
FLAGS = ("scratch", "ds", "batch_dice")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = [t for t in (arg or "").split(",") if t]
    unknown = [t for t in tokens if t not in BACKBONES and t not in MODALITIES
               and t not in FRACTIONS and t not in FLAGS]
    if unknown:
        raise KeyError(f"unknown variant token(s) {unknown}")
    backbone = next((t for t in tokens if t in BACKBONES), "plain_unet")
    modality = next((t for t in tokens if t in MODALITIES), "joint")
    fraction = FRACTIONS[next((t for t in tokens if t in FRACTIONS), "frac100")]
    name, preset, lr = BACKBONES[backbone]
    tiny = backbone == "tiny"

    c = ml_collections.ConfigDict()
    c.task = "seg"
    c.variant = ",".join(tokens) or "plain_unet"
    c.store = ""  # the harmonized store with labels (`petct preprocess --out STORE`)
    # Weights to start from: an MAE run directory (`petct pretrain --workdir`), a directory
    # written by `petct convert torch2jax`, or "scratch". Encoder and decoder are loaded,
    # the output head is re-initialised.
    c.init = "scratch" if "scratch" in tokens else ""
    c.init_which = "best"  # checkpoint of an init run: "best" (validation loss), "latest", or a step
    c.seed = 0
    c.total_steps = 400 if tiny else 17_500
    c.batch_size = 2 if tiny else 4  # global batch
    c.grad_accum = 1

    c.data = ml_collections.ConfigDict()
    c.data.channels = MODALITIES[modality]
    c.data.patch = (32, 32, 32) if tiny else (96, 128, 128)
    c.data.normalization = "zscore"  # the paper's per-scan z-score; or "nnunet"
    c.data.zoom_prob = 0.0  # the reference's fine-tuning crops are not zoomed
    c.data.zoom_range = (0.9, 1.1)
    c.data.foreground_fraction = 1 / 3  # nnU-Net: the last third of each batch on a lesion
    c.data.augment = ml_collections.ConfigDict(dict(  # nnU-Net v2's probabilities (augment.py)
        flip_prob=(0.5, 0.5, 0.5), rotate_prob=0.2, rotate_max_deg=15.0, scale_prob=0.2,
        scale_range=(0.85, 1.25), noise_prob=0.1, noise_std_range=(0.0, 0.1),
        brightness_prob=0.15, brightness_range=(0.75, 1.25), contrast_prob=0.15,
        contrast_range=(0.75, 1.25), gamma_prob=0.3, gamma_range=(0.7, 1.5)))
    c.data.num_workers = 0 if tiny else 8
    c.data.split = ""  # split file (JSON train/val/test, or the reference's CSV); "" = derive one
    c.data.val_fraction = 0.1  # of the labelled scans, whole patients (when data.split is "")
    c.data.test_fraction = 0.2
    c.data.split_seed = 0
    c.data.label_fraction = fraction  # of the training pool's scans, whole patients
    c.data.label_seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = name
    c.model.preset = preset
    c.model.dtype = "float32" if tiny else "bfloat16"  # compute dtype; parameters stay f32
    c.model.remat = ""
    c.model.overrides = ml_collections.ConfigDict()
    if tiny:  # = configs/pretrain.py:tiny
        c.model.overrides.n_stages = 4
        c.model.overrides.features_per_stage = (8, 16, 32, 64)
        c.model.overrides.strides = (1, 2, 2, 2)

    c.loss = ml_collections.ConfigDict()
    c.loss.dice_weight = 1.0
    c.loss.ce_weight = 1.0
    c.loss.batch_dice = "batch_dice" in tokens  # False: MONAI's per-sample Dice
    c.loss.include_background = True  # MONAI DiceCELoss default
    c.loss.deep_supervision = "ds" in tokens
    c.loss.ds_label_mode = "nearest"  # or "max"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = lr
    c.optim.end_lr = 1e-6
    c.optim.warmup_steps = 10 if tiny else 0  # the reference: plain cosine
    c.optim.weight_decay = 1e-5
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.min_fsdp_size = 2 ** 18
    c.mesh.rules = ()

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every_steps = 100 if tiny else 500
    c.ckpt.keep = 2
    c.ckpt.keep_best = 1
    c.ckpt.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.test = True  # score the test split with the best checkpoint after training
    c.eval.overlap = 0.5
    c.eval.batch_windows = 2 if tiny else 4
    c.eval.mirror = False  # nnU-Net's 8-fold mirroring at test time
    c.eval.overlays = 2

    c.log_every = 10 if tiny else 50
    c.eval_every = 100 if tiny else 500
    c.eval_batches = 2 if tiny else 16
    c.preview_every = 100 if tiny else 2_000
    c.on_nonfinite = "stop"
    return c
