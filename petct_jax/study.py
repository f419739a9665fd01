"""`petct study`: the paper's experiment grid, cell by cell, resumable, with one report.

    petct study --config configs/study.py:autopet --workdir W \
        --config.store=STORE --config.split=autopet_split.csv --dry-run
    petct study --config configs/study.py:autopet,swin_base --workdir W --config.store=... \
        --config.split=...                        # run every cell in order, then the report
    petct study ... --cells 'plain_unet/seg_*_s1'  # only these cells (names or globs)
    petct study ... --report-only                  # table and figures from the finished cells

The grid (configs/study.py): per backbone, MAE pretraining (joint PET+CT, PET-only, CT-only),
fine-tuning from scratch and from the joint MAE at each label fraction and seed, and k-shot
linear probes of the joint vs the separated (PET-only + CT-only) MAE features. Each *cell* is
a normal run directory `W/cells/<backbone>/<cell>/` of `petct pretrain`, `petct finetune`
or `petct probe`, with a config the study resolves from configs/pretrain.py, finetune.py or
probe.py plus overrides; the dry run prints them, so any cell can also be run by hand with
the same command line.

Execution: cells run one after another in dependency order (MAE cells first; fine-tunes from
the MAE and the probes need their MAE cells finished). A finished cell (its summary.json says
so: all steps, plus the test scores for fine-tunes, all seeds for probes) is skipped; an
unfinished one resumes from its last checkpoint. Re-running the same command therefore
continues a study after a crash or a preemption.

Parallel execution: cells are independent jobs once their dependencies are finished. A
cluster can fan out with the same study config and `--cells`: first the MAE cells (one job
each, `--cells plain_unet/mae_joint` ...), then every fine-tune and probe cell as its own
job; a job whose cell needs an unfinished cell stops with an error instead of training it.
With `--cells` no report is written; a last `petct study ... --report-only` (or the same
command without `--cells`, which skips every finished cell) collects W/report.md,
W/results.csv and W/figures/.

The dry run (`--dry-run`) resolves every cell's config, prints the plan (cell, kind, config
variant, key overrides, steps, dependencies, status of an existing W) and an estimate of
accelerator-hours; it trains nothing, imports no JAX and never opens the store.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from petct_jax.compile_cache import enable_compile_cache
from petct_jax.errors import PetctError

KINDS = ("pretrain", "finetune", "probe")
CONFIG_FILES = {"pretrain": "pretrain.py", "finetune": "finetune.py", "probe": "probe.py"}
FRACTION_TOKENS = {10: "frac10", 30: "frac30", 100: "frac100"}
PROBE_BACKBONES = ("plain_unet", "resenc_l", "swin_small", "swin_base", "swin_large")

# --- The accelerator-hours estimate --------------------------------------------------------
# Forward pass of one 96x128x128 patch (batch 1, 2 channels in, 2 out) in TFLOP, as counted by
# XLA's cost analysis of the jitted forward of each backbone's default config (lowered, not
# compiled: `forward_tflop(token)` recomputes it; tests/test_study.py checks these). They
# agree with a layer-by-layer count (benchmarks/data_pipeline.py: 0.72 for plain_unet).
REF_PATCH = (96, 128, 128)
FORWARD_TFLOP = {
    "plain_unet": 0.695,   # nnU-Net PlainConvUNet 32..320, 31.2M parameters
    "resenc_l": 1.026,     # ResidualEncoderUNet L, 102.4M
    "swin_small": 0.325,   # SwinUNETR v2 small, 18.3M
    "swin_base": 1.239,    # SwinUNETR v2 base, 74.6M
    "swin_large": 5.009,   # SwinUNETR v2 large, 319.2M
    "tiny": 0.0427,        # configs/*.py:tiny PlainConvUNet 8..64, 0.35M
}
# A training step costs about 3 forward passes (forward, input gradients, weight gradients);
# a linear probe runs its frozen backbones forward only (its 1x1x1 head is negligible).
TRAIN_FORWARDS = 3.0
ESTIMATE_BASIS = (
    "Estimate, not a measurement: seconds = FLOP / (mfu x peak). FLOP per patch = the "
    "backbone's forward TFLOP at 96x128x128 (XLA cost analysis, petct_jax/study.py: "
    "FORWARD_TFLOP), scaled by patch voxels, x3 for a training step (x1 for a probe's frozen "
    "backbones, x2 backbones for the separated probe); plus validation batches every eval_every "
    "steps and the sliding-window test evaluation (estimate.test_scans scans of "
    "estimate.scan_shape, overlap eval.overlap, x8 with eval.mirror). Peak {peak:g} TFLOP/s "
    "(H100 SXM dense BF16), mfu {mfu:.0%} assumed (3D convolutions typically reach 15-40%; "
    "benchmarks/RESULTS.md assumes 20%, which would make every number 1.5x larger). Not "
    "counted: compilation, data loading stalls, checkpoint writes. Hours are summed over "
    "cells on one accelerator; data parallelism over N devices divides a cell's time by at "
    "most N.")


@dataclasses.dataclass(eq=False)
class Cell:
    """One run of the grid. `name` is `<backbone>/<short>`; `config` the resolved run config."""

    name: str
    kind: str
    backbone: str
    variant: str  # of configs/<kind file>
    overrides: tuple[str, ...]  # everything the study sets, in the order applied
    key_overrides: tuple[str, ...]  # the cell's own (what tells it apart from its siblings)
    depends: tuple[str, ...]
    workdir: str
    config: ml_collections.ConfigDict = dataclasses.field(repr=False)
    modality: str | None = None  # pretrain
    init: str | None = None  # finetune: scratch | mae
    fraction: int | None = None  # finetune: percent of labels
    seed: int | None = None  # finetune (pretrain: its config's seed)
    mode: str | None = None  # probe: joint | separate
    k: int | None = None  # probe
    seeds: tuple[int, ...] = ()  # probe

    @property
    def short(self) -> str:
        return self.name.split("/", 1)[1]

    @property
    def config_file(self) -> str:
        return CONFIG_FILES[self.kind]

    def command(self) -> str:
        """The equivalent stand-alone command line (from the repository root)."""
        args = " ".join(_quote(f"--config.{o}") for o in self.overrides)
        return f"petct {self.kind} --config configs/{self.config_file}:{self.variant} --workdir {self.workdir} {args}"

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "backbone": self.backbone,
                "config": f"configs/{self.config_file}:{self.variant}",
                "overrides": list(self.overrides), "key_overrides": list(self.key_overrides),
                "depends": list(self.depends), "workdir": self.workdir,
                **{k: v for k, v in (("modality", self.modality), ("init", self.init),
                                     ("fraction", self.fraction), ("seed", self.seed),
                                     ("mode", self.mode), ("k", self.k)) if v is not None},
                **({"seeds": list(self.seeds)} if self.seeds else {}), "command": self.command()}


def _quote(text: str) -> str:
    return f"'{text}'" if any(ch in text for ch in " ()'\",") else text


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True,
                        help="configs/study.py[:VARIANT] (autopet, demo; backbone tokens); then any "
                             "--config.KEY=VALUE, e.g. --config.store=STORE --config.split=SPLIT.csv")
    parser.add_argument("--workdir", required=True, help="study directory: cells in W/cells/, report in W/")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every cell, its config, steps and dependencies, and the estimated "
                             "accelerator-hours; train nothing, open no store")
    parser.add_argument("--cells", default="",
                        help="comma-separated cell names or globs (e.g. 'plain_unet/mae_joint', "
                             "'mae_*', 'swin_base/*'): run only these (their dependencies must be "
                             "finished); no report is written")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: collect W/report.md, W/results.csv and W/figures "
                             "from the cells finished so far")


def run(args) -> int:
    from petct_jax.config import resolve

    config = resolve(args.config, args.config_overrides)
    cells = plan(config, args.workdir)
    if args.dry_run:
        print(format_plan(config, args.workdir, cells, select(cells, args.cells)))
        return 0
    if args.report_only:
        if args.cells:
            raise PetctError("--report-only collects every cell; it takes no --cells")
        results = collect(cells, args.workdir)
        path = write_report(config, args.workdir, results)
        print(f"study: {results['n_done']}/{len(cells)} cells finished; report at {path}")
        return 0
    from petct_jax.train import distributed
    distributed.initialize()  # before anything asks JAX for devices (multi-host jobs)
    results = study(config, args.workdir, cells=args.cells, report=not args.cells)
    done = [c for c in select(cells, args.cells) if results["status"][c.name] == "done"]
    print(f"study: {len(done)} of {len(select(cells, args.cells))} selected cells finished "
          f"({results['n_done']}/{len(cells)} in the study)"
          + (f"; report at {os.path.join(args.workdir, 'report.md')}" if not args.cells else ""))
    return 0


# --- The plan ------------------------------------------------------------------------------

def plan(config: ml_collections.ConfigDict, workdir: str) -> list[Cell]:
    """Every cell of the study, in dependency order, with its resolved config.

    Resolves configs only (no JAX, no store): the dry run and the tests call it freely.
    """
    from petct_jax.config import apply_overrides, packaged_config, resolve, validate

    for key, allowed in (("mae.modalities", ("joint", "pet", "ct")),
                         ("finetune.inits", ("scratch", "mae")),
                         ("probe.modes", ("joint", "separate"))):
        group, leaf = key.split(".")
        bad = [v for v in config[group][leaf] if v not in allowed]
        if bad:
            raise PetctError(f"--config.{key}: unknown {bad}; choose from {allowed}")
    if config.finetune.schedule not in ("epochs", "steps"):
        raise PetctError(f"--config.finetune.schedule={config.finetune.schedule!r}: 'epochs' or 'steps'")
    bad = [f for f in config.finetune.fractions if not 0 < f <= 100]
    if bad:
        raise PetctError(f"--config.finetune.fractions: {bad} not in (0, 100] (percent)")
    modalities = tuple(config.mae.modalities)
    if "mae" in config.finetune.inits and "joint" not in modalities:
        raise PetctError("fine-tuning from the MAE needs 'joint' in --config.mae.modalities")
    if "joint" in config.probe.modes and "joint" not in modalities:
        raise PetctError("the joint probe needs 'joint' in --config.mae.modalities")
    if "separate" in config.probe.modes and not {"pet", "ct"} <= set(modalities):
        raise PetctError("the separated probe needs 'pet' and 'ct' in --config.mae.modalities")
    if not config.backbones:
        raise PetctError("--config.backbones is empty")

    root = os.path.join(workdir, config.cells_dir)
    pre_store = config.pretrain_store or config.store
    common, cells = list(config.overrides), []

    def add(kind, backbone, short, variant, base, own, depends=(), **fields):
        name = f"{backbone}/{short}"
        cfg = resolve(f"{packaged_config(CONFIG_FILES[kind])}:{variant}", base)
        own = own(cfg) if callable(own) else own
        apply_overrides(cfg, own)
        validate(cfg)  # the cell's own settings too, not only what resolve saw
        cells.append(Cell(name=name, kind=kind, backbone=backbone, variant=variant,
                          overrides=tuple(base) + tuple(own), key_overrides=tuple(own),
                          depends=tuple(f"{backbone}/{d}" for d in depends),
                          workdir=os.path.join(root, backbone, short), config=cfg, **fields))

    for bb in config.backbones:
        mae_dir = lambda m, bb=bb: os.path.join(root, bb, f"mae_{m}")
        for m in modalities:
            base = [f"store={pre_store}", *([f"data.exclude={config.split}"] if config.split else []),
                    *common, *config.mae.overrides]
            add("pretrain", bb, f"mae_{m}", f"{bb},{m}", base, [], modality=m)
        seg_base = [f"store={config.store}", *([f"data.split={config.split}"] if config.split else []),
                    *common]
        for init in config.finetune.inits:
            for frac in config.finetune.fractions:
                for seed in config.seeds:
                    token = FRACTION_TOKENS.get(int(frac)) if float(frac) == int(frac) else None
                    variant = f"{bb},{token}" if token else bb
                    own = lambda cfg, frac=frac, seed=seed, init=init, token=token: [
                        *([] if token else [f"data.label_fraction={frac / 100}"]),
                        f"init={'scratch' if init == 'scratch' else mae_dir('joint')}",
                        f"seed={seed}", f"data.label_seed={seed}",
                        *_schedule(cfg, frac, config.finetune.schedule)]
                    add("finetune", bb, f"seg_{init}_frac{_pct(frac)}_s{seed}", variant,
                        [*seg_base, *config.finetune.overrides], own,
                        depends=("mae_joint",) if init == "mae" else (), init=init,
                        fraction=frac, seed=int(seed))
        for mode in config.probe.modes:
            for k in config.probe.shots:
                # probe.py's backbone tokens only matter for init=scratch; "tiny" sets CPU sizes
                variant = f"{bb},{mode}" if bb in PROBE_BACKBONES or bb == "tiny" else mode
                inits = ([f"init={mae_dir('joint')}"] if mode == "joint" else
                         [f"init_pet={mae_dir('pet')}", f"init_ct={mae_dir('ct')}"])
                own = [*inits, f"k={k}", f"seeds={tuple(int(s) for s in config.probe.seeds)}"]
                add("probe", bb, f"probe_{mode}_k{k}", variant, [*seg_base, *config.probe.overrides],
                    own, depends=("mae_joint",) if mode == "joint" else ("mae_pet", "mae_ct"),
                    mode=mode, k=int(k), seeds=tuple(int(s) for s in config.probe.seeds))
    for c in cells:
        if c.kind == "pretrain":
            c.seed = int(c.config.seed)
    return cells


def _pct(frac) -> str:
    return f"{frac:g}".replace(".", "p")


def _schedule(cfg: ml_collections.ConfigDict, frac, schedule: str) -> list[str]:
    """The "epochs" schedule: total_steps (the 100% budget) scaled by the label fraction, and
    validation / checkpoints with it, so every fraction is validated as often."""
    if schedule == "steps" or frac >= 100:
        return []
    scale = frac / 100
    steps = max(int(round(cfg.total_steps * scale)), 1)
    return [f"total_steps={steps}", f"eval_every={max(int(round(cfg.eval_every * scale)), 1)}",
            f"ckpt.every_steps={max(int(round(cfg.ckpt.every_steps * scale)), 1)}"]


def select(cells: Sequence[Cell], spec: str | Sequence[str] | None) -> list[Cell]:
    """The cells named by `spec` (comma-separated names or globs, full `backbone/cell` or the
    part after the slash), in plan order; all cells when empty."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec or []) if s.strip()]
    if not items:
        return list(cells)
    chosen = set()
    for item in items:
        hits = {c.name for c in cells if fnmatch.fnmatchcase(c.name, item)
                or fnmatch.fnmatchcase(c.short, item)}
        if not hits:
            raise PetctError(f"--cells: {item!r} names no cell of this study; cells: "
                             + ", ".join(c.name for c in cells))
        chosen |= hits
    return [c for c in cells if c.name in chosen]


# --- State of a cell on disk ---------------------------------------------------------------

def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _latest_checkpoint(workdir: str) -> int | None:
    from petct_jax.train.checkpoint import finished_steps

    steps = finished_steps(workdir)
    return steps[-1] if steps else None


def cell_summary(cell: Cell) -> dict | None:
    """The cell's summary.json if it says the cell is finished, else None.

    pretrain: written when training ends, with all steps; finetune: also the test scores
    (written after them); probe: written once every seed has trained and been scored.
    """
    s = _read_json(os.path.join(cell.workdir, "summary.json"))
    if not s:
        return None
    total = int(cell.config.total_steps)
    if cell.kind == "pretrain":
        return s if s.get("task") == "mae" and int(s.get("steps") or 0) >= total else None
    if cell.kind == "finetune":
        return s if s.get("task") == "seg" and "test" in s and int(s.get("steps") or 0) >= total else None
    if s.get("task") != "probe" or not set(cell.seeds) <= set(s.get("seeds") or []):
        return None
    for seed in cell.seeds:
        sub = _read_json(os.path.join(cell.workdir, f"seed_{seed}", "summary.json")) or {}
        if int(sub.get("steps") or 0) < total:
            return None
    return s


def cell_status(cell: Cell) -> tuple[str, str]:
    """("done" | "partial" | "new", detail)."""
    if cell_summary(cell) is not None:
        return "done", ""
    if not os.path.isdir(cell.workdir):
        return "new", ""
    if cell.kind == "probe":
        steps = {s: _latest_checkpoint(os.path.join(cell.workdir, f"seed_{s}")) for s in cell.seeds}
        started = {s: v for s, v in steps.items() if v is not None}
        return ("partial", ", ".join(f"seed {s} at step {v}" for s, v in started.items())) if started \
            else ("new", "")
    step = _latest_checkpoint(cell.workdir)
    if step is not None:
        return "partial", f"checkpoint at step {step} of {cell.config.total_steps}"
    summary = _read_json(os.path.join(cell.workdir, "summary.json"))
    if summary and cell.kind == "finetune" and "test" not in summary:
        return "partial", "trained; test scores missing"
    return "new", ""


# --- Running -------------------------------------------------------------------------------

def run_cell(cell: Cell) -> dict:
    """Train (or resume) one cell with the command it belongs to."""
    if cell.kind == "pretrain":
        from petct_jax.mae.pretrain import pretrain
        return pretrain(cell.config, cell.workdir)
    if cell.kind == "finetune":
        from petct_jax.downstream.finetune import finetune
        return finetune(cell.config, cell.workdir)
    from petct_jax.downstream.probe import probe
    return probe(cell.config, cell.workdir)


def _is_main_process() -> bool:
    if "jax" not in sys.modules:
        return True
    import jax
    return jax.process_index() == 0


def _write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # several fan-out jobs may write the same file
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def study(config: ml_collections.ConfigDict, workdir: str, *, cells: str | Sequence[str] | None = None,
          runner: Callable[[Cell], Any] | None = None, report: bool = True,
          on_cell: Callable[[Cell, str], None] | None = None) -> dict:
    """Run the selected cells (all by default) in dependency order, skipping finished ones,
    and collect the results (`collect`); with `report`, write W/report.md, results.csv, figures.

    runner(cell) trains one cell (default `run_cell`); on_cell(cell, status) is called before
    each selected cell, finished or not (the demo prints its stages from it).
    """
    if not config.store:
        raise PetctError("--config.store is not set: the harmonized store with labels "
                         "(`petct preprocess --out STORE`)")
    if not config.split:
        raise PetctError("--config.split is not set: a split file (the reference's CSV or a JSON "
                         "train/val/test) whose test scans stay out of pretraining")
    all_cells = plan(config, workdir)
    chosen = select(all_cells, cells)
    by_name = {c.name: c for c in all_cells}
    if config.compile_cache and runner is None:
        # Cells of equal shapes (PET-only and CT-only, the seeds of a setting) compile once.
        enable_compile_cache(os.path.join(workdir, "jax_cache"))
    runner = runner or run_cell
    if _is_main_process():
        _write_json(os.path.join(workdir, "study.json"),
                    {"config": json.loads(config.to_json_best_effort()),
                     "cells": [c.describe() for c in all_cells]})
    for n, cell in enumerate(chosen, 1):
        status, detail = cell_status(cell)
        if on_cell:
            on_cell(cell, status)
        if status == "done":
            _log(f"[study {n}/{len(chosen)}] {cell.name}: finished before, skipped")
            continue
        waiting = [d for d in cell.depends if cell_summary(by_name[d]) is None]
        if waiting:
            raise PetctError(f"cell {cell.name} needs {', '.join(waiting)}, not finished: run "
                             f"{'it' if len(waiting) == 1 else 'them'} first (--cells "
                             f"{','.join(waiting)}) or without --cells")
        _log(f"[study {n}/{len(chosen)}] {cell.name}: {cell.kind} "
             f"({'resuming, ' + detail if status == 'partial' else 'new'}) in {cell.workdir}")
        _check_cell_record(cell)
        runner(cell)
    results = collect(all_cells, workdir)
    if report and _is_main_process():
        write_report(config, workdir, results)
    return results


def _check_cell_record(cell: Cell) -> None:
    """Write W/cells/.../cell.json; say so when a cell resumes under other settings."""
    path = os.path.join(cell.workdir, "cell.json")
    old = _read_json(path)
    if old and old.get("overrides") != list(cell.overrides):
        changed = sorted(set(old.get("overrides", [])) ^ set(cell.overrides))
        _log(f"  note: {cell.name} was started with other overrides (differing: {changed}); "
             "it resumes from its checkpoint with the new ones")
    if _is_main_process():
        _write_json(path, cell.describe())


# --- Results -------------------------------------------------------------------------------

# Test metrics per fine-tune / probe seed (keys of metrics.summarize), in results.csv.
METRICS = ("mean_dice", "std_dice", "median_dice", "mean_fpv_ml", "mean_fnv_ml", "mean_hd95_mm",
           "lesion_f1")
CSV_FIELDS = ("cell", "backbone", "kind", "setting", "modality", "init", "fraction", "mode", "k",
              "seed", "status", "steps", "best_step", "seconds", "n_test", *METRICS, "val_loss",
              "val_dice")


def setting_of(cell: Cell) -> str:
    """What a cell measures, seeds aside: the key results are averaged over."""
    if cell.kind == "pretrain":
        return f"mae_{cell.modality}"
    if cell.kind == "finetune":
        return f"seg_{cell.init}_frac{_pct(cell.fraction)}"
    return f"probe_{cell.mode}_k{cell.k}"


def collect(cells: Sequence[Cell], workdir: str) -> dict:
    """Read every cell's files: {"cells": {name: {...}}, "rows": one per cell and seed,
    "settings": mean ± std over seeds per (backbone, setting), "status", "n_done"}."""
    out_cells, rows, status = {}, [], {}
    for cell in cells:
        summary = cell_summary(cell)
        st, detail = cell_status(cell) if summary is None else ("done", "")
        status[cell.name] = st
        out_cells[cell.name] = {"cell": cell, "status": st, "detail": detail, "summary": summary}
        base = {"cell": cell.name, "backbone": cell.backbone, "kind": cell.kind,
                "setting": setting_of(cell), "modality": cell.modality, "init": cell.init,
                "fraction": cell.fraction, "mode": cell.mode, "k": cell.k, "status": st}
        if summary is None:
            for seed in (cell.seeds or (cell.seed,)):
                rows.append({**base, "seed": seed})
            continue
        if cell.kind == "probe":
            for seed in cell.seeds:
                r = (summary.get("per_seed") or {}).get(str(seed), {})
                sub = _read_json(os.path.join(cell.workdir, f"seed_{seed}", "summary.json")) or {}
                test = sub.get("test") or {}
                rows.append({**base, "seed": seed, "steps": sub.get("steps"),
                             "best_step": r.get("best_step"), "seconds": sub.get("seconds"),
                             "n_test": test.get("n_cases"),
                             **{m: r.get(m, test.get(m)) for m in METRICS},
                             "val_loss": (sub.get("final_val") or {}).get("loss"),
                             "val_dice": r.get("val_dice")})
            continue
        test = summary.get("test") or {}
        val = summary.get("final_val") or {}
        rows.append({**base, "seed": cell.seed, "steps": summary.get("steps"),
                     "best_step": summary.get("best_step"), "seconds": summary.get("seconds"),
                     "n_test": test.get("n_cases"), **{m: test.get(m) for m in METRICS},
                     "val_loss": val.get("loss"), "val_dice": val.get("dice")})
    return {"cells": out_cells, "rows": rows, "settings": aggregate(rows), "status": status,
            "n_done": sum(s == "done" for s in status.values()), "workdir": workdir}


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Mean and population standard deviation (ddof=0) over seeds of every metric, per
    (backbone, setting), from the finished rows; settings in the rows' order."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["setting"]), []).append(r)
    out = []
    for (backbone, setting), members in groups.items():
        done = [r for r in members if r["status"] == "done"]
        first = members[0]
        entry = {"backbone": backbone, "setting": setting, "kind": first["kind"],
                 **{k: first.get(k) for k in ("modality", "init", "fraction", "mode", "k")},
                 "seeds": [r["seed"] for r in done], "n_planned": len(members)}
        for key in (*METRICS, "val_loss", "val_dice"):
            values = np.array([r[key] for r in done if r.get(key) is not None], dtype=np.float64)
            entry[key] = {"mean": float(values.mean()) if values.size else None,
                          "std": float(values.std()) if values.size else None, "n": int(values.size)}
        out.append(entry)
    return out


def write_results_csv(path: str, rows: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def write_report(config: ml_collections.ConfigDict, workdir: str, results: dict) -> str:
    """W/results.csv, W/report.md and W/figures/ of the study (petct_jax/demo_report.py)."""
    from petct_jax.demo_report import write_study_report

    write_results_csv(os.path.join(workdir, "results.csv"), results["rows"])
    return write_study_report(workdir, config, results)


# --- The accelerator-hours estimate --------------------------------------------------------

def forward_tflop(token: str, patch: Sequence[int] = REF_PATCH) -> float:
    """The forward TFLOP of backbone `token` (configs/finetune.py's default for it) on one
    patch, from XLA's cost analysis of the lowered forward pass (nothing is compiled or
    allocated). How FORWARD_TFLOP was made; needs JAX."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from petct_jax.config import packaged_config, resolve
    from petct_jax.models.conv_cpu import use_impl
    from petct_jax.train.backbone import build_backbone
    from petct_jax.train.plan import xla_flops

    cfg = resolve(f"{packaged_config('finetune.py')}:{token}")
    model = nnx.eval_shape(lambda: build_backbone(cfg.model, 2, 2, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, *patch, 2), jnp.float32)
    # The accelerator's graph (one convolution per layer): the CPU path's depth-tap
    # decomposition computes some rows it then drops, which cost analysis would count.
    with use_impl("xla"):
        lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x)
    return xla_flops(lowered) / 1e12


def sliding_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Windows nnU-Net-style tiling places on a scan (step = patch x (1 - overlap))."""
    n = 1
    for s, p in zip(shape, patch):
        step = max(p * (1 - overlap), 1)
        n *= 1 if s <= p else int(math.ceil((s - p) / step)) + 1
    return n


def estimate(cell: Cell, est: ml_collections.ConfigDict) -> dict:
    """{"steps", "train_steps" (all seeds), "ms_per_step", "hours", "note"} for one cell."""
    cfg = cell.config
    token = cell.backbone
    note = ""
    if token not in FORWARD_TFLOP:
        return {"steps": int(cfg.total_steps), "train_steps": int(cfg.total_steps), "ms_per_step": None,
                "hours": None, "note": f"no FLOP figure for backbone {token!r}"}
    from petct_jax.config import packaged_config, resolve
    default = resolve(f"{packaged_config(cell.config_file)}:{cell.variant}")
    if cell.kind != "probe" and cfg.model.to_dict() != default.model.to_dict():
        note = f"model overridden: FLOP of {token}'s default, scaled by patch only"
    patch = tuple(cfg.data.patch)
    flop = FORWARD_TFLOP[token] * math.prod(patch) / math.prod(REF_PATCH) * 1e12  # per patch
    rate = est.mfu * est.peak_tflops * 1e12  # FLOP/s
    batch, steps = int(cfg.batch_size), int(cfg.total_steps)
    n_backbones = 2 if cell.kind == "probe" and cell.mode == "separate" else 1
    per_step = batch * flop * (n_backbones if cell.kind == "probe" else TRAIN_FORWARDS)
    n_evals = steps // int(cfg.eval_every) + (steps % int(cfg.eval_every) != 0)
    val = n_evals * int(cfg.eval_batches) * batch * flop * n_backbones
    test = 0.0
    if cell.kind != "pretrain" and cfg.eval.test:
        windows = sliding_windows(est.scan_shape, patch, float(cfg.eval.overlap))
        test = est.test_scans * windows * (8 if cfg.eval.mirror else 1) * flop * n_backbones
    runs = len(cell.seeds) if cell.kind == "probe" else 1
    seconds = runs * (steps * per_step + val + test) / rate
    return {"steps": steps, "train_steps": steps * runs, "ms_per_step": 1e3 * per_step / rate,
            "hours": seconds / 3600, "note": note}


# --- The dry run ---------------------------------------------------------------------------

def format_plan(config: ml_collections.ConfigDict, workdir: str, cells: Sequence[Cell],
                chosen: Sequence[Cell] | None = None) -> str:
    chosen = list(cells if chosen is None else chosen)
    est = {c.name: estimate(c, config.estimate) for c in chosen}
    exists = os.path.isdir(workdir)
    unset = lambda v, key: v or f"<unset: --config.{key}>"
    lines = [
        f"petct study: configs/study.py:{config.variant} -> {workdir}",
        f"  store {unset(config.store, 'store')}; pretraining store "
        f"{config.pretrain_store or '(= store)'}; split {unset(config.split, 'split')}",
        f"  backbones {', '.join(config.backbones)}; MAE {', '.join(config.mae.modalities)}; "
        f"fine-tuning {', '.join(config.finetune.inits)} at "
        f"{'/'.join(_pct(f) for f in config.finetune.fractions)}% labels "
        f"(schedule '{config.finetune.schedule}') x seeds {tuple(config.seeds)}; probes "
        f"{', '.join(config.probe.modes)} k={tuple(config.probe.shots)} x seeds {tuple(config.probe.seeds)}",
        f"  {len(chosen)} of {len(cells)} cells" + ("" if len(chosen) == len(cells) else " (--cells)")
        + f"; cells in {os.path.join(workdir, config.cells_dir)}/<cell>/",
    ]
    if config.overrides:
        lines.append("  every cell: " + " ".join(config.overrides))
    for kind, group in (("pretrain", "mae"), ("finetune", "finetune"), ("probe", "probe")):
        if config[group].overrides:
            lines.append(f"  every {kind} cell: " + " ".join(config[group].overrides))
    header = ["#", "cell", "kind", "config", "steps", "batch", "depends on", "H100-h (est.)", "status"]
    table = []
    for n, c in enumerate(chosen, 1):
        e = est[c.name]
        steps = f"{e['steps']:,}" + (f" x{len(c.seeds)} seeds" if c.kind == "probe" else "")
        status = " ".join(cell_status(c)) if exists else "new"
        table.append([str(n), c.name, c.kind, f"{c.config_file}:{c.variant}", steps,
                      str(c.config.batch_size), ", ".join(c.depends) or "-",
                      "n/a" if e["hours"] is None else f"{e['hours']:.2f}", status.strip()])
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    lines += ["", fmt(header), fmt(["-" * w for w in widths])]
    for row, c in zip(table, chosen):
        lines.append(fmt(row))
        lines.append("      " + " ".join(_quote(o) for o in c.key_overrides + _shared_keys(c)))
        if est[c.name]["note"]:
            lines.append(f"      ({est[c.name]['note']})")
    total = sum(e["hours"] or 0 for e in est.values())
    by_kind = {k: sum(est[c.name]["hours"] or 0 for c in chosen if c.kind == k) for k in KINDS}
    lines += ["", f"total: {len(chosen)} cells, {sum(e['train_steps'] for e in est.values()):,} "
              f"training steps, about {total:.1f} H100-hours (estimate: "
              + ", ".join(f"{k} {h:.1f}" for k, h in by_kind.items() if any(c.kind == k for c in chosen))
              + ")"]
    rate = config.estimate.mfu * config.estimate.peak_tflops  # TFLOP/s
    for bb, patch in sorted({(c.backbone, tuple(c.config.data.patch)) for c in chosen if c.kind != "probe"}):
        if bb in FORWARD_TFLOP:
            ms = 1e3 * TRAIN_FORWARDS * FORWARD_TFLOP[bb] * math.prod(patch) / math.prod(REF_PATCH) / rate
            lines.append(f"  {bb}: {FORWARD_TFLOP[bb]:.3g} TFLOP forward per 96x128x128 patch -> "
                         f"{ms:.1f} ms per training patch at {'x'.join(map(str, patch))}")
    lines += ["", _wrap(ESTIMATE_BASIS.format(peak=config.estimate.peak_tflops, mfu=config.estimate.mfu)),
              "", _wrap("Order and parallelism: cells run one after another in the order above; the "
                        "MAE cells have no dependencies, every other cell only the MAE cells listed. "
                        "To fan out on a cluster, run the MAE cells as separate jobs "
                        f"(`petct study --config ... --workdir {workdir} --cells NAME`), then each "
                        "fine-tune and probe cell likewise, and finally `--report-only`. Each cell "
                        "is also a plain `petct pretrain|finetune|probe` run: `--config "
                        "configs/<file>:<variant>` plus the overrides shown (and those for every "
                        "cell) with `--workdir` its cell directory.")]
    return "\n".join(lines)


def _shared_keys(cell: Cell) -> tuple[str, ...]:
    """Store and split overrides, shown per cell (they differ between pretrain and the rest)."""
    shown = [o for o in cell.overrides if o.split("=", 1)[0] in ("store", "data.split", "data.exclude")]
    return tuple("store=<unset>" if o == "store=" else o for o in shown)


def _wrap(text: str, width: int = 100) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))
