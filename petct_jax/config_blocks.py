"""The parts that the config files (configs/pretrain.py, finetune.py, probe.py, study.py)
share: variant-token parsing, the backbone table, and groups of settings.

It is a module of its own rather than a file in configs/ because config files are loaded
by path under made-up module names (`petct_jax.config.load_config_file`), so a file given
by path outside the package can import it but not a sibling config.
"""

from __future__ import annotations

import ml_collections

# Backbone variant tokens: (model.name, model.preset, learning rate of MAE pretraining and
# fine-tuning). tiny is a CPU-sized PlainConvUNet (see `model`) for laptops, tests and the demo.
BACKBONES = {
    "plain_unet": ("plain_unet", "paper", 5e-4),  # the paper's nnU-Net 6-stage 32..320
    "resenc_l": ("resenc_unet", "L", 5e-4),
    "swin_small": ("swin_unetr", "small", 1e-4),
    "swin_base": ("swin_unetr", "base", 1e-4),
    "swin_large": ("swin_unetr", "large", 1e-4),
    "tiny": ("plain_unet", "paper", 2e-3),
}
# Modality variant tokens: the store channels a network is trained on.
MODALITIES = {"joint": ("pet", "ct"), "pet": ("pet",), "ct": ("ct",)}


def variant_tokens(arg: str | None, *known) -> list[str]:
    """The comma-separated tokens of `arg`, each of which must be in one of `known`.

    Raises KeyError, which the config loader reports as an unknown variant.
    """
    tokens = [t for t in (arg or "").split(",") if t]
    unknown = [t for t in tokens if not any(t in group for group in known)]
    if unknown:
        raise KeyError(f"unknown variant token(s) {unknown}")
    return tokens


def model(name: str, preset: str, tiny: bool) -> ml_collections.ConfigDict:
    """`config.model`: backbone `name` at `preset`, or the tiny PlainConvUNet."""
    group = ml_collections.ConfigDict()
    group.name = name
    group.preset = preset
    group.dtype = "float32" if tiny else "bfloat16"  # compute dtype; parameters stay f32
    group.remat = ""  # "", "stage" or "stage_dots"
    group.overrides = ml_collections.ConfigDict()  # constructor arguments of the backbone
    if tiny:  # 4 stages, widths 8..64: about 0.3M parameters
        group.overrides.n_stages = 4
        group.overrides.features_per_stage = (8, 16, 32, 64)
        group.overrides.strides = (1, 2, 2, 2)
    return group


def optim(*, lr: float, warmup_steps: int, weight_decay: float) -> ml_collections.ConfigDict:
    """`config.optim`: AdamW, linear warmup then cosine decay to `end_lr`, clipped gradients."""
    group = ml_collections.ConfigDict()
    group.lr = lr
    group.end_lr = 1e-6
    group.warmup_steps = warmup_steps
    group.weight_decay = weight_decay
    group.clip_norm = 1.0
    group.b1 = 0.9
    group.b2 = 0.999
    group.eps = 1e-8
    return group


def no_augmentation() -> ml_collections.ConfigDict:
    """`data.augment` with every probability 0: the reference's plain random crops."""
    return ml_collections.ConfigDict(dict(
        flip_prob=(0.0, 0.0, 0.0), rotate_prob=0.0, rotate_max_deg=15.0, scale_prob=0.0,
        scale_range=(0.85, 1.25), noise_prob=0.0, noise_std_range=(0.0, 0.1),
        brightness_prob=0.0, brightness_range=(0.75, 1.25), contrast_prob=0.0,
        contrast_range=(0.75, 1.25), gamma_prob=0.0, gamma_range=(0.7, 1.5)))


def steps_for_epochs(epochs: int, n_scans: int, batch_size: int, *, drop_last: bool) -> int:
    """Optimizer steps of `epochs` passes over `n_scans` scans in batches of `batch_size`, as a
    PyTorch DataLoader counts them: ceil(n / batch) per epoch, floor with `drop_last` (the
    reference drops the last partial batch in MAE pretraining, keeps it in fine-tuning)."""
    from petct_jax.errors import PetctError

    per_epoch = n_scans // batch_size if drop_last else -(-n_scans // batch_size)
    if epochs < 1 or per_epoch < 1:
        raise PetctError(f"epochs={epochs} over {n_scans} scans at batch_size={batch_size}: no "
                         "steps to train (need epochs >= 1 and at least one full batch of scans)")
    return int(epochs) * per_epoch


def apply_epochs(config: ml_collections.ConfigDict, n_scans: int, *, drop_last: bool) -> int:
    """With `config.epochs` > 0, set `config.total_steps` to that many epochs over `n_scans`
    training scans (`steps_for_epochs`); the run's step count either way. Runs call it once
    they know their training scans, before the loop writes W/config.json."""
    if int(config.get("epochs", 0) or 0) > 0:
        config.total_steps = steps_for_epochs(int(config.epochs), n_scans, int(config.batch_size),
                                              drop_last=drop_last)
    return int(config.total_steps)


def mesh() -> ml_collections.ConfigDict:
    """`config.mesh`: data parallel over every device unless `fsdp` is raised."""
    group = ml_collections.ConfigDict()
    group.data = -1  # all devices not used by fsdp
    group.fsdp = 1  # >1 splits parameters and optimizer state (large Swin models)
    group.min_fsdp_size = 2 ** 18
    group.rules = ()  # ((regex, "spec,..."), ...) by parameter path; first match wins
    return group


def ckpt(every_steps: int) -> ml_collections.ConfigDict:
    """`config.ckpt`: the latest two checkpoints and the best by validation loss."""
    group = ml_collections.ConfigDict()
    group.every_steps = every_steps
    group.keep = 2
    group.keep_best = 1
    group.async_save = True
    return group


# `data.dtype` of every config. "float16" halves the bytes through worker processes and onto
# the device, but numpy's float32 -> float16 cast costs more CPU per patch than the smaller
# copies save (benchmarks/RESULTS.md, data_pipeline): float32 feeds an accelerator with fewer cores.
IMAGE_DTYPE = "float32"


def seg_data(channels: tuple[str, ...], tiny: bool) -> ml_collections.ConfigDict:
    """`config.data` of lesion segmentation (fine-tuning, probes): nnU-Net's patch sampling
    and augmentation, and the train/val/test split."""
    group = ml_collections.ConfigDict()
    group.channels = channels
    group.patch = (32, 32, 32) if tiny else (96, 128, 128)
    group.normalization = "zscore"  # the paper's per-scan z-score; or "nnunet"
    group.zoom_prob = 0.0  # the reference's fine-tuning crops are not zoomed
    group.zoom_range = (0.9, 1.1)
    group.foreground_fraction = 1 / 3  # nnU-Net: the last third of each batch on a lesion
    group.dtype = IMAGE_DTYPE
    group.augment = ml_collections.ConfigDict(dict(  # nnU-Net v2's probabilities (augment.py)
        flip_prob=(0.5, 0.5, 0.5), rotate_prob=0.2, rotate_max_deg=15.0, scale_prob=0.2,
        scale_range=(0.85, 1.25), noise_prob=0.1, noise_std_range=(0.0, 0.1),
        brightness_prob=0.15, brightness_range=(0.75, 1.25), contrast_prob=0.15,
        contrast_range=(0.75, 1.25), gamma_prob=0.3, gamma_range=(0.7, 1.5)))
    group.num_workers = 0 if tiny else 8
    group.split = ""  # split file (JSON train/val/test, or the reference's CSV); "" = derive one
    group.val_fraction = 0.1  # of the labelled scans, whole patients (when data.split is "")
    group.test_fraction = 0.2
    group.split_seed = 0
    return group


def seg_loss(*, batch_dice: bool, deep_supervision: bool) -> ml_collections.ConfigDict:
    """`config.loss` of lesion segmentation: Dice + CE as MONAI's DiceCELoss."""
    group = ml_collections.ConfigDict()
    group.dice_weight = 1.0
    group.ce_weight = 1.0
    group.batch_dice = batch_dice  # False: MONAI's per-sample Dice
    group.include_background = True  # MONAI DiceCELoss default
    group.deep_supervision = deep_supervision
    group.ds_label_mode = "nearest"  # or "max"
    return group


def seg_eval(tiny: bool) -> ml_collections.ConfigDict:
    """`config.eval` of lesion segmentation: sliding windows over the test split's scans."""
    group = ml_collections.ConfigDict()
    group.test = True  # score the test split with the best checkpoint after training
    group.overlap = 0.5
    # "gaussian": nnU-Net's importance map (sigma = window / 8); "constant": every voxel of a
    # window counts alike, MONAI sliding_window_inference's default and the reference's.
    group.window_weights = "gaussian"
    group.batch_windows = 2 if tiny else 4
    group.mirror = False  # nnU-Net's 8-fold mirroring at test time
    group.overlays = 2
    return group
