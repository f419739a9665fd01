"""k-shot linear probing of frozen pretrained features, big_vision style:
`configs/probe.py:VARIANT` (definition: `petct_jax/downstream/probe.py`).

VARIANT is a comma-separated list of tokens, e.g. `tiny`, `tiny,separate`, `k10,bottleneck`:
  mode:     joint (default: one PET+CT network, --config.init=MAE_RUN), separate (a
            PET-only and a CT-only network, --config.init_pet / --config.init_ct, features
            concatenated)
  features: decoder (default: the last decoder stage, full resolution), bottleneck
            (the deepest encoder features; logits upsampled trilinearly)
  shots:    k1, k5 (default), k10, k20: patients with lesions per seed
  size:     tiny (CPU-sized patches, batch and schedule; the backbones come from their
            MAE runs, whatever their size)
  backbone: plain_unet (default), resenc_l, swin_small, swin_base, swin_large: only used
            with --config.init=scratch (frozen random features, a floor for the probe)
Every value can also be set with `--config.KEY=VALUE`.

Our choices (the reference has no probing code): a 1x1x1 conv head, AdamW 1e-3 without
weight decay, cosine over `total_steps`, Dice + CE as in fine-tuning, batch 4 of patches
with one third on lesions, fine-tuning augmentation, three seeds.
"""

import ml_collections

BACKBONES = {
    "plain_unet": ("plain_unet", "paper"),
    "resenc_l": ("resenc_unet", "L"),
    "swin_small": ("swin_unetr", "small"),
    "swin_base": ("swin_unetr", "base"),
    "swin_large": ("swin_unetr", "large"),
}
SHOTS = {"k1": 1, "k5": 5, "k10": 10, "k20": 20}
FLAGS = ("tiny", "joint", "separate", "decoder", "bottleneck")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = [t for t in (arg or "").split(",") if t]
    unknown = [t for t in tokens if t not in BACKBONES and t not in SHOTS and t not in FLAGS]
    if unknown:
        raise KeyError(f"unknown variant token(s) {unknown}")
    tiny = "tiny" in tokens
    name, preset = BACKBONES[next((t for t in tokens if t in BACKBONES), "plain_unet")]

    c = ml_collections.ConfigDict()
    c.task = "probe"
    c.variant = ",".join(tokens) or "joint"
    c.store = ""
    c.mode = "separate" if "separate" in tokens else "joint"
    c.init = ""  # joint: an MAE run directory, a `petct convert` directory, or "scratch"
    c.init_pet = ""  # separated: the PET-only MAE run ...
    c.init_ct = ""  # ... and the CT-only one
    c.init_which = "best"  # checkpoint of the init runs: "best", "latest" or a step
    c.feature = "bottleneck" if "bottleneck" in tokens else "decoder"
    c.k = SHOTS[next((t for t in tokens if t in SHOTS), "k5")]
    c.all_scans = False  # True: all scans of the k patients, not one lesion scan each
    c.seeds = (0, 1, 2)  # one sub-run W/seed_<s>/ each (shots, head init, data order)
    c.seed = 0  # set per sub-run from `seeds`
    c.model_seed = 0  # the frozen random backbone of init="scratch"
    c.total_steps = 200 if tiny else 2_000
    c.batch_size = 2 if tiny else 4
    c.grad_accum = 1

    c.data = ml_collections.ConfigDict()
    c.data.channels = ("pet", "ct")  # what the loader reads; each backbone takes its own
    c.data.patch = (32, 32, 32) if tiny else (96, 128, 128)
    c.data.normalization = "zscore"
    c.data.zoom_prob = 0.0
    c.data.zoom_range = (0.9, 1.1)
    c.data.foreground_fraction = 1 / 3
    c.data.augment = ml_collections.ConfigDict(dict(
        flip_prob=(0.5, 0.5, 0.5), rotate_prob=0.2, rotate_max_deg=15.0, scale_prob=0.2,
        scale_range=(0.85, 1.25), noise_prob=0.1, noise_std_range=(0.0, 0.1),
        brightness_prob=0.15, brightness_range=(0.75, 1.25), contrast_prob=0.15,
        contrast_range=(0.75, 1.25), gamma_prob=0.3, gamma_range=(0.7, 1.5)))
    c.data.num_workers = 0 if tiny else 8
    c.data.split = ""
    c.data.val_fraction = 0.1
    c.data.test_fraction = 0.2
    c.data.split_seed = 0

    c.model = ml_collections.ConfigDict()  # only for init="scratch"
    c.model.name = name
    c.model.preset = preset
    c.model.dtype = "float32" if tiny else "bfloat16"
    c.model.remat = ""
    c.model.overrides = ml_collections.ConfigDict()
    if tiny:
        c.model.overrides.n_stages = 4
        c.model.overrides.features_per_stage = (8, 16, 32, 64)
        c.model.overrides.strides = (1, 2, 2, 2)

    c.loss = ml_collections.ConfigDict()
    c.loss.dice_weight = 1.0
    c.loss.ce_weight = 1.0
    c.loss.batch_dice = False
    c.loss.include_background = True
    c.loss.deep_supervision = False  # one head, one output
    c.loss.ds_label_mode = "nearest"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.end_lr = 1e-6
    c.optim.warmup_steps = 10 if tiny else 50
    c.optim.weight_decay = 0.0
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
    c.ckpt.every_steps = 100 if tiny else 250
    c.ckpt.keep = 2
    c.ckpt.keep_best = 1
    c.ckpt.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.test = True
    c.eval.overlap = 0.5
    c.eval.batch_windows = 2 if tiny else 4
    c.eval.mirror = False
    c.eval.overlays = 2

    c.log_every = 10 if tiny else 50
    c.eval_every = 100 if tiny else 250
    c.eval_batches = 2 if tiny else 16
    c.preview_every = 100 if tiny else 1_000
    c.on_nonfinite = "stop"
    return c
