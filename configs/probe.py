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

from petct_jax import config_blocks as blocks

# Those of the MAE configs but tiny, which here sizes the run, not the backbone.
BACKBONES = tuple(t for t in blocks.BACKBONES if t != "tiny")
SHOTS = {"k1": 1, "k5": 5, "k10": 10, "k20": 20}
FLAGS = ("tiny", "joint", "separate", "decoder", "bottleneck")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = blocks.variant_tokens(arg, BACKBONES, SHOTS, FLAGS)
    tiny = "tiny" in tokens
    name, preset, _ = blocks.BACKBONES[next((t for t in tokens if t in BACKBONES), "plain_unet")]

    c = ml_collections.ConfigDict()
    c.task = "probe"
    c.variant = ",".join(tokens) or "joint"
    c.store = ""
    c.mode = "separate" if "separate" in tokens else "joint"
    c.init = ""  # joint: an MAE run directory, a `petct convert` directory, or "scratch"
    c.init_pet = ""  # separated: the PET-only MAE run ...
    c.init_ct = ""  # ... and the CT-only one
    c.allow_preset_mismatch = False  # backbones of another harmonization preset than the store's
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

    # What the loader reads; each backbone takes its own channels.
    c.data = blocks.seg_data(("pet", "ct"), tiny)
    c.model = blocks.model(name, preset, tiny)  # only for init="scratch"
    c.loss = blocks.seg_loss(batch_dice=False, deep_supervision=False)  # one head, one output
    c.optim = blocks.optim(lr=1e-3, warmup_steps=10 if tiny else 50, weight_decay=0.0)
    c.mesh = blocks.mesh()
    c.ckpt = blocks.ckpt(every_steps=100 if tiny else 250)
    c.eval = blocks.seg_eval(tiny)

    c.log_every = 10 if tiny else 50
    c.eval_every = 100 if tiny else 250
    c.eval_batches = 2 if tiny else 16
    c.preview_every = 100 if tiny else 1_000
    c.on_nonfinite = "stop"
    return c
