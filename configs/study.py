"""The paper's experiment grid for `petct study`, big_vision style: `configs/study.py:VARIANT`.

A study is a set of *cells*, each a normal run of `petct pretrain`, `petct finetune` or
`petct probe` in `W/cells/<backbone>/<cell>/` (see `petct_jax/study.py`):
  MAE pretraining      joint PET+CT, PET-only and CT-only (`mae.modalities`)
  fine-tuning          from scratch and from the joint MAE (`finetune.inits`), at label
                       fractions 10/30/100% (`finetune.fractions`), for every seed (`seeds`)
  k-shot linear probe  joint features vs PET-only + CT-only features (`probe.modes`), for
                       each k of `probe.shots`; each probe cell runs all `probe.seeds`

VARIANT is a comma-separated list of tokens, e.g. `autopet`, `autopet,swin_base`,
`autopet,plain_unet,swin_base,seeds5`, `demo`, `demo,quick`:
  data:      autopet (default): a harmonized AutoPET store, given with --config.store=STORE,
             and the reference split file with --config.split=SPLIT.csv (or .json); its test
             scans are kept out of MAE pretraining and scored once per fine-tune / probe seed.
             demo: exactly the grid `petct demo` runs (a CPU-sized UNet on phantoms); `petct
             demo` makes the store and split and sets them. quick: with demo, `petct demo --quick`.
  backbone:  plain_unet (default), resenc_l, swin_small, swin_base, swin_large, tiny; several
             backbone tokens put several backbones in one study (cells per backbone)
  seeds:     seeds1, seeds3 (default), seeds5: fine-tuning seeds and probe seeds
Every value can also be set with `--config.KEY=VALUE`, e.g.
  --config.finetune.fractions=(10,100) --config.seeds=(0,1)
  --config.pretrain_store=gs://bucket/all_cohorts   (pretrain on the 4-cohort store)
  --config.finetune.overrides="('total_steps=5000', 'data.num_workers=16')"
Overrides of the cells (`overrides`, `mae.overrides`, `finetune.overrides`, `probe.overrides`)
are tuples of `KEY=VALUE` strings for configs/pretrain.py, finetune.py and probe.py; the study
applies them after its own settings (store, split) and before each cell's own (init, seed,
steps of the label-fraction schedule, k, seeds).
"""

import ml_collections

from petct_jax import config_blocks as blocks

BACKBONES = tuple(blocks.BACKBONES)  # the backbone tokens of the cells' configs
SEEDS = {"seeds1": (0,), "seeds3": (0, 1, 2), "seeds5": (0, 1, 2, 3, 4)}
FLAGS = ("autopet", "demo", "quick")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = blocks.variant_tokens(arg, BACKBONES, SEEDS, FLAGS)
    if "quick" in tokens and "demo" not in tokens:
        raise KeyError("'quick' goes with 'demo'")
    if "demo" in tokens and "autopet" in tokens:
        raise KeyError("choose one of 'demo' and 'autopet'")
    backbones = tuple(dict.fromkeys(t for t in tokens if t in BACKBONES)) or ("plain_unet",)
    seeds = SEEDS[next((t for t in tokens if t in SEEDS), "seeds3")]

    c = ml_collections.ConfigDict()
    c.task = "study"
    c.variant = ",".join(tokens) or "autopet"
    c.store = ""  # the labelled store (`petct preprocess --out STORE`): fine-tuning and probes
    c.pretrain_store = ""  # the MAE pretraining store if another one (e.g. all cohorts); "" = store
    c.split = ""  # split file: JSON {"train","val","test"} or the reference's CSV (data/splits.py)
    c.cells_dir = "cells"  # cells live in W/<cells_dir>/<backbone>/<cell>/
    c.backbones = backbones
    c.seeds = seeds  # fine-tuning seeds: model init, data order and label subset (label_seed)
    c.overrides = ()  # KEY=VALUE for every cell (keys present in all three configs)
    c.compile_cache = True  # a JAX compilation cache in W/jax_cache: cells of equal shapes compile once

    c.mae = ml_collections.ConfigDict()
    c.mae.modalities = ("joint", "pet", "ct")  # joint feeds fine-tuning; pet + ct the separated probe
    c.mae.overrides = ()

    c.finetune = ml_collections.ConfigDict()
    c.finetune.inits = ("scratch", "mae")  # mae: from the joint MAE cell of the same backbone
    c.finetune.fractions = (10, 30, 100)  # percent of the training pool's scans with labels
    # "epochs": total_steps (the 100% budget: 100 epochs of 700 scans at batch 4 = 17,500) is
    # scaled by the fraction, as the reference trains 100 epochs over the labelled scans
    # (10% = 1,750 steps); "steps": every fraction trains total_steps.
    c.finetune.schedule = "epochs"
    c.finetune.overrides = ()

    c.probe = ml_collections.ConfigDict()
    c.probe.modes = ("joint", "separate")
    c.probe.shots = (5,)  # k: patients with lesions per seed
    c.probe.seeds = seeds
    c.probe.overrides = ()

    # Accelerator-hours of `--dry-run` (an estimate, see petct_jax/study.py: FORWARD_TFLOP).
    c.estimate = ml_collections.ConfigDict()
    c.estimate.peak_tflops = 989.0  # H100 SXM dense BF16 tensor-core peak (NVIDIA datasheet)
    c.estimate.mfu = 0.30  # assumed share of the peak that training steps reach
    c.estimate.test_scans = 200  # the reference split's test patients (one scan each)
    c.estimate.scan_shape = (326, 160, 260)  # assumed body-cropped AutoPET scan at 3x2x2 mm (z,y,x)

    if "demo" in tokens:
        _demo(c, quick="quick" in tokens)
    return c


def _demo(c: ml_collections.ConfigDict, quick: bool) -> None:
    """The grid `petct demo` runs: its sizes and their translation live with the demo
    (petct_jax/demo.py: DEMO, QUICK, apply_sizes), so the two cannot drift apart."""
    from petct_jax.demo import DEMO, QUICK, apply_sizes

    apply_sizes(c, QUICK if quick else DEMO)
