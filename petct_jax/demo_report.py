"""The reports of `petct demo` and `petct study`: W/report.md with the test-split tables
and PNG figures in W/figures/.

Everything printed is read back from the cells' own files (summary.json, metrics.jsonl,
test/cases.csv, previews; gathered by `petct_jax.study.collect`), so the report shows what
was measured. `write_report` is the demo's (one seed, a threshold baseline, the demo's
sizes); `write_study_report` the study's, for any set of cells: backbones, label fractions,
seeds (mean ± standard deviation over seeds), probes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np

from petct_jax.train.metrics import read_metrics

SETTINGS = [(("scratch", "frac10"), "scratch, 10% labels"), (("scratch", "frac100"), "scratch, 100% labels"),
            (("mae", "frac10"), "MAE joint, 10% labels"), (("mae", "frac100"), "MAE joint, 100% labels")]
# The demo table's volume columns (keys of metrics.summarize): FPV, then FNV as autoPET I and
# as autoPET III/IV aggregate it.
VOLUMES = ("mean_fpv_ml", "mean_fnv_ml", "mean_fnv_ml_autopet3")


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pm(mean, std) -> str:
    return "n/a" if mean is None else f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def threshold_baseline(store_root: str, ids: list[str], suv: float = 4.0) -> dict:
    """Dice/FPV/FNV of `SUV >= suv` on the test scans: what no learning gives."""
    from petct_jax.downstream import metrics
    from petct_jax.store import Store

    store = Store(store_root)
    rows = []
    for case in ids:
        arrays = store.read(case, ["pet", "seg"])
        pred = (arrays["pet"].astype(np.float32) >= suv).astype(np.uint8)
        rows.append(metrics.evaluate_arrays(pred, arrays["seg"], store.record(case)["spacing_zyx"]))
    return metrics.summarize(rows)


def _learning_curves(path: str, groups: dict[str, dict[str, str]]) -> None:
    """One panel per group (title -> {label: run directory}): train and validation loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], groups.items()):
        for i, (name, run_dir) in enumerate(runs.items()):
            rows = read_metrics(run_dir) if os.path.isdir(run_dir) else []
            train = [(r["step"], r["loss"]) for r in rows if "split" not in r and "loss" in r]
            val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "val"]
            color = f"C{i % 10}"
            if train:
                ax.plot(*zip(*train), color=color, label=f"{name} train")
            if val:
                ax.plot(*zip(*val), "o--", color=color, label=f"{name} val")
        ax.set_title(title), ax.set_xlabel("step"), ax.set_ylabel("loss")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _curve_groups(results: dict, label) -> dict[str, dict[str, str]]:
    """MAE cells and fine-tuning cells (of the first seed), labelled by `label(cell)`."""
    cells = [e["cell"] for e in results["cells"].values()]
    first_seed = next((c.seed for c in cells if c.kind == "finetune"), None)
    return {"MAE pretraining (reconstruction loss)":
                {label(c): c.workdir for c in cells if c.kind == "pretrain"},
            "fine-tuning (Dice + CE)":
                {label(c): c.workdir for c in cells if c.kind == "finetune" and c.seed == first_seed}}


def _dice_bars(path: str, labels: list[str], means: list, errors: list,
               colors: list[str] | None = None, ylabel: str = "test Dice (scans with lesions)") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(10, 0.8 * len(labels)), 4))
    x = np.arange(len(labels))
    ax.bar(x, [m or 0 for m in means], yerr=[e or 0 for e in errors], capsize=4,
           color=colors or ["C7"] + ["C0"] * 4 + ["C2", "C3"])
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _copy_previews(workdir: str, figures: str, results: dict, backbone: str | None = None) -> dict:
    """Copy the last MAE reconstruction preview of the joint MAE cell and the last test overlay
    of the fine-tune from the MAE with the most labels (first seed) into W/figures/."""
    cells = [e["cell"] for e in results["cells"].values()
             if backbone is None or e["cell"].backbone == backbone]
    mae = next((c for c in cells if c.kind == "pretrain" and c.modality == "joint"), None)
    tuned = sorted((c for c in cells if c.kind == "finetune" and c.init == "mae"),
                   key=lambda c: (-c.fraction, c.seed))
    copied = {}
    for name, cell, sub in (("mae_reconstruction.png", mae, "previews/*.png"),
                            ("segmentation_overlay.png", tuned[0] if tuned else None,
                             "test/overlays/*.png")):
        found = sorted(glob.glob(os.path.join(cell.workdir, sub))) if cell else []
        if found:
            shutil.copyfile(found[-1], os.path.join(figures, name))
            copied[name] = os.path.relpath(found[-1], workdir)
    return copied


def _demo_runs(results: dict) -> tuple[dict, dict, dict, dict]:
    """The demo's cells by role: (mae by modality, fine-tunes by (init, "fracN"), probes by
    mode, cell by short name); summaries of the finished cells."""
    mae, tuned, probes, cells = {}, {}, {}, {}
    for entry in results["cells"].values():
        cell, summary = entry["cell"], entry["summary"] or {}
        cells[cell.short] = cell
        if cell.kind == "pretrain":
            mae[cell.modality] = summary
        elif cell.kind == "finetune":
            tuned[(cell.init, f"frac{cell.fraction}")] = summary
        else:
            probes[cell.mode] = summary
    return mae, tuned, probes, cells


def write_report(workdir: str, store: str, split_path: str, results: dict, sizes: dict,
                 seconds: float) -> str:
    """The demo's report, from its study's results (`petct_jax.study.collect`)."""
    mae, tuned, probes, cells = _demo_runs(results)
    figures = os.path.join(workdir, "figures")
    os.makedirs(figures, exist_ok=True)
    split = json.load(open(split_path))
    base = threshold_baseline(store, split["test"])

    rows = [("PET threshold SUV ≥ 4 (no learning)", base.get("mean_dice"), base.get("std_dice"),
             *(base.get(k) for k in VOLUMES))]
    for key, label in SETTINGS:
        test = tuned.get(key, {}).get("test") or {}
        rows.append((f"fine-tune: {label}", test.get("mean_dice"), test.get("std_dice"),
                     *(test.get(k) for k in VOLUMES)))
    for mode, label in (("joint", "joint PET+CT MAE features"),
                        ("separate", "PET-only + CT-only MAE features")):
        s = probes.get(mode, {}).get("stats") or {}
        rows.append((f"{sizes['k_shot']}-shot probe: {label}", s.get("mean_dice", {}).get("mean"),
                     s.get("mean_dice", {}).get("std"), *(s.get(k, {}).get("mean") for k in VOLUMES)))

    _dice_bars(os.path.join(figures, "dice_per_setting.png"), [r[0] for r in rows],
               [r[1] for r in rows], [r[2] for r in rows])
    # One seed: curves labelled as the runs were before cells had seeds (seg_mae_frac10).
    _learning_curves(os.path.join(figures, "learning_curves.png"),
                     _curve_groups(results, lambda c: c.short.removesuffix(f"_s{c.seed}")
                                   if c.kind == "finetune" else c.short))
    copied = _copy_previews(workdir, figures, results)
    cells_glob = os.path.relpath(os.path.join(next(iter(cells.values())).workdir, os.pardir), workdir)

    mae_val = {m: (s.get("final_val") or {}).get("loss") for m, s in mae.items()}
    lines = [
        "# petct-jax demo report",
        "",
        "**Synthetic data, small model, short training.** Everything here ran on "
        f"{_cpu_text()} in {seconds / 60:.1f} minutes: {sizes['cases']} digital phantom studies "
        f"(`petct phantoms`, size `{sizes['phantom_size']}`), harmonized at "
        f"{'x'.join(f'{s:g}' for s in sizes['spacing_zyx'])} mm, a {len(sizes['widths'])}-stage "
        f"PlainConvUNet of widths {'-'.join(map(str, sizes['widths']))} (the paper: 6 stages, 32-320), "
        f"batches of {sizes['batch_size']} {'x'.join(map(str, sizes['patch']))} patches, "
        f"{sizes['pretrain_steps']} MAE steps, {sizes['finetune_steps']} fine-tuning steps"
        f"{' (batch Dice + CE)' if sizes.get('batch_dice') else ''}, "
        f"{sizes['probe_steps']} probe steps per seed. "
        "These numbers show the pipeline working end to end; they are not the paper's result and "
        "say little about it. `petct study` runs the same grid at the paper's scale.",
        "",
        f"Split (patient level, `split.json`): train {len(split['train'])}, validation "
        f"{len(split['val'])}, test {len(split['test'])} scans; "
        f"{base.get('n_with_lesions', 0)} test scans have lesions, {base.get('n_tumour_free', 0)} are "
        "tumour-free. Pretraining used the train and validation scans only; checkpoints were "
        "chosen on the validation loss, never on the test scans.",
        "",
        "## Test split",
        "",
        "Dice is the mean over test scans with lesions (± its standard deviation over those scans; "
        "for probes ± the standard deviation over seeds); FPV (mL, 18-connectivity) is the mean "
        "over all test scans; FNV (mL) in both challenge aggregations: autoPET I (a tumour-free "
        "scan counts 0, mean over all test scans) and autoPET III/IV (tumour-free scans left "
        "out, mean over the test scans with lesions).",
        "",
        "| setting | Dice | FPV mL | FNV mL, autoPET I | FNV mL, autoPET III/IV |",
        "|---|---|---|---|---|",
        *[f"| {name} | {_pm(m, s)} | {_fmt(fpv, 2)} | {_fmt(fnv1, 2)} | {_fmt(fnv3, 2)} |"
          for name, m, s, fpv, fnv1, fnv3 in rows],
        "",
        "MAE validation reconstruction loss (lower is better): " +
        ", ".join(f"{m} {_fmt(v, 4)}" for m, v in mae_val.items()) + ".",
        "",
        "## What this shows, and what it does not",
        "",
        *_reading(rows),
        "",
        "## Figures",
        "",
        "- Learning curves: ![](figures/learning_curves.png)",
        "- Test Dice per setting: ![](figures/dice_per_setting.png)",
    ]
    if "mae_reconstruction.png" in copied:
        lines.append(f"- MAE reconstruction (joint model, {copied['mae_reconstruction.png']}): "
                     "![](figures/mae_reconstruction.png)")
    if "segmentation_overlay.png" in copied:
        lines.append("- Segmentation overlay (MAE joint, 100% labels; PET MIP and CT with ground truth "
                     "and prediction): ![](figures/segmentation_overlay.png)")
    lines += ["", f"Per-run details: `{cells_glob}/*/summary.json`, `{cells_glob}/*/test/cases.csv`, "
              f"`{cells_glob}/*/metrics.jsonl`, TensorBoard in `{cells_glob}/*/tensorboard`; "
              "`results.csv` has one row per run and seed.", ""]
    path = os.path.join(workdir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": [dict(zip(("setting", "dice", "dice_std", *VOLUMES), r)) for r in rows],
                   "mae_val_loss": mae_val, "sizes": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in sizes.items()},
                   "seconds": seconds}, f, indent=2)
    return path


def _reading(rows: list) -> list[str]:
    """Plain sentences comparing the measured numbers, whichever way they come out."""
    d = {name: dice for name, dice, *_ in rows}
    out = []
    learned = [dice for name, dice, *_ in rows if name.startswith("fine-tune") and dice is not None]
    if not learned or max(learned) < 0.05:
        out.append("- No fine-tuned model learned to segment at this training length (test Dice "
                   "below 0.05 everywhere), so the comparisons below carry no information about "
                   "the paper's claims; train longer (`petct study`) to test them.")
    pre10, scr100 = d.get("fine-tune: MAE joint, 10% labels"), d.get("fine-tune: scratch, 100% labels")
    scr10 = d.get("fine-tune: scratch, 10% labels")
    if None not in (pre10, scr100, scr10):
        verdict = "matches or beats" if pre10 >= scr100 - 0.02 else "falls short of"
        out.append(f"- Paper claim 1 (pretrained at 10% labels ≈ scratch at 100%): here the pretrained "
                   f"model at 10% reaches Dice {pre10:.3f}, which {verdict} scratch at 100% "
                   f"({scr100:.3f}); scratch at 10% reaches {scr10:.3f}.")
    joint = next((dice for name, dice, *_ in rows if "joint PET+CT MAE" in name), None)
    sep = next((dice for name, dice, *_ in rows if "PET-only + CT-only" in name), None)
    if None not in (joint, sep):
        verdict = "above" if round(joint, 3) > round(sep, 3) else "not above"
        out.append(f"- Paper claim 2 (joint PET/CT pretraining beats separated pretraining under "
                   f"few-shot linear probing): joint {joint:.3f} vs separated {sep:.3f}, {verdict}.")
        if max(joint, sep) < 0.05:
            out.append("- Neither linear probe learned to segment (test Dice below 0.05; see their "
                       "FPV and FNV), so claim 2 is not tested here: a linear head on the features "
                       "of a small MAE trained for a few hundred steps did not pick out the lesions.")
    out.append("- With a few hundred CPU steps on a handful of synthetic scans, differences of a few "
               "Dice points are within run-to-run noise; treat the table as a functional check of the "
               "whole system (phantoms -> store -> MAE -> fine-tune/probe -> sliding-window "
               "inference -> AutoPET metrics), not as evidence for or against the paper.")
    return out


def _cpu_text() -> str:
    return f"{os.cpu_count()} CPU cores"


# ---------------------------------------------------------------------------
# The study's report: any backbones, label fractions, seeds and probes.

def _ms(stat: dict | None, digits: int = 3) -> str:
    """mean ± std over seeds (population); the mean alone for one seed; n/a for none."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    if stat.get("n", 0) < 2:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _seeds_text(entry: dict) -> str:
    done, planned = len(entry["seeds"]), entry["n_planned"]
    return f"{done}" if done == planned else f"{done} of {planned}"


def _label_efficiency(path: str, settings: list[dict], backbones: list[str]) -> None:
    """Test Dice against the label fraction, one line per initialisation, error bars = std
    over seeds; one panel per backbone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(backbones), figsize=(5 * len(backbones), 4), squeeze=False)
    for ax, bb in zip(axes[0], backbones):
        tuned = [e for e in settings if e["backbone"] == bb and e["kind"] == "finetune"]
        for i, init in enumerate(dict.fromkeys(e["init"] for e in tuned)):
            pts = sorted((e["fraction"], e["mean_dice"]["mean"], e["mean_dice"]["std"] or 0.0)
                         for e in tuned if e["init"] == init and e["mean_dice"]["mean"] is not None)
            if pts:
                x, y, err = zip(*pts)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=4, color=f"C{i}",
                            label="MAE joint" if init == "mae" else init)
        ax.set_xscale("log")
        fractions = sorted({e["fraction"] for e in tuned})
        if fractions:
            ax.set_xticks(fractions, [f"{f:g}%" for f in fractions])
        ax.set_xlabel("labelled training scans"), ax.set_ylabel("test Dice (scans with lesions)")
        ax.set_ylim(0, 1), ax.set_title(bb)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _setting_label(e: dict, several_backbones: bool) -> str:
    what = (f"MAE {e['modality']}" if e["kind"] == "pretrain" else
            f"{'MAE joint' if e['init'] == 'mae' else 'scratch'}, {e['fraction']:g}%" if e["kind"] == "finetune"
            else f"{e['k']}-shot probe, {e['mode']}")
    return f"{e['backbone']}: {what}" if several_backbones else what


def _versus(a: dict, b: dict) -> tuple[str, str]:
    """(how mean `a` compares with mean `b`, judged by their spread over seeds; a caveat)."""
    diff = a["mean"] - b["mean"]
    spreads = [x["std"] for x in (a, b) if x.get("n", 0) >= 2 and x["std"] is not None]
    if not spreads:
        return ("above" if diff > 0 else "below" if diff < 0 else "equal to",
                " (one seed: no spread over seeds to judge the difference by)")
    noise = max(spreads)
    return ("within one standard deviation over seeds of" if abs(diff) <= noise else
            "above" if diff > 0 else "below"), ""


def _study_reading(settings: list[dict], backbones: list[str]) -> list[str]:
    """Sentences on the paper's two claims, per backbone, whichever way the numbers come out."""
    out = []
    learned = [e["mean_dice"]["mean"] for e in settings
               if e["kind"] == "finetune" and e["mean_dice"]["mean"] is not None]
    if learned and max(learned) < 0.05:
        out.append("- No fine-tuned model learned to segment (test Dice below 0.05 everywhere), so "
                   "the comparisons below carry no information about the paper's claims.")
    for bb in backbones:
        tuned = {(e["init"], e["fraction"]): e["mean_dice"] for e in settings
                 if e["backbone"] == bb and e["kind"] == "finetune"}
        fractions = sorted({f for _, f in tuned})
        low, full = (fractions[0], fractions[-1]) if fractions else (None, None)
        pre, scr = tuned.get(("mae", low)), tuned.get(("scratch", full))
        if low is not None and low < full and pre and scr and None not in (pre["mean"], scr["mean"]):
            verdict, note = _versus(pre, scr)
            out.append(f"- {bb}, claim 1 (pretrained with {low:g}% of the labels ≈ scratch with "
                       f"{full:g}%): MAE joint at {low:g}% reaches Dice {_ms(pre)}, {verdict} "
                       f"scratch at {full:g}% ({_ms(scr)}){note}.")
        else:
            out.append(f"- {bb}, claim 1: not measured yet (needs the MAE fine-tune at the lowest and "
                       "the scratch fine-tune at the highest label fraction).")
        for k in sorted({e["k"] for e in settings if e["backbone"] == bb and e["kind"] == "probe"}):
            probes = {e["mode"]: e["mean_dice"] for e in settings
                      if e["backbone"] == bb and e["kind"] == "probe" and e["k"] == k}
            joint, sep = probes.get("joint"), probes.get("separate")
            if joint and sep and None not in (joint["mean"], sep["mean"]):
                verdict, note = _versus(joint, sep)
                out.append(f"- {bb}, claim 2 ({k}-shot linear probing, joint PET/CT pretraining "
                           f"beats separated): joint {_ms(joint)}, {verdict} separated {_ms(sep)}{note}.")
            else:
                out.append(f"- {bb}, claim 2 ({k}-shot): not measured yet.")
    return out


def write_study_report(workdir: str, config, results: dict) -> str:
    """W/report.md and W/figures/ of `petct study` (W/results.csv is written by the study)."""
    figures = os.path.join(workdir, "figures")
    os.makedirs(figures, exist_ok=True)
    settings = results["settings"]
    cells = [e["cell"] for e in results["cells"].values()]
    backbones = list(dict.fromkeys(c.backbone for c in cells))
    several = len(backbones) > 1
    tuned = [e for e in settings if e["kind"] == "finetune"]
    probes = [e for e in settings if e["kind"] == "probe"]
    maes = [e for e in settings if e["kind"] == "pretrain"]

    if tuned:
        _label_efficiency(os.path.join(figures, "label_efficiency.png"), settings, backbones)
    bars = tuned + probes
    if bars:
        _dice_bars(os.path.join(figures, "dice_per_setting.png"),
                   [_setting_label(e, several) for e in bars], [e["mean_dice"]["mean"] for e in bars],
                   [e["mean_dice"]["std"] for e in bars],
                   colors=[("C0" if e.get("init") == "mae" else "C7") if e["kind"] == "finetune" else
                           ("C2" if e["mode"] == "joint" else "C3") for e in bars],
                   ylabel="test Dice (mean ± std over seeds)")
    _learning_curves(os.path.join(figures, "learning_curves.png"),
                     _curve_groups(results, lambda c: c.name if several else c.short))
    copied = _copy_previews(workdir, figures, results, backbones[0] if backbones else None)

    not_done = [e for e in results["cells"].values() if e["status"] != "done"]
    head = lambda *cols: [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
    lines = [
        f"# petct-jax study report: `configs/study.py:{config.variant}`",
        "",
        f"{results['n_done']} of {len(cells)} cells finished. Store `{config.store}`"
        + (f", pretraining store `{config.pretrain_store}`" if config.pretrain_store else "")
        + f", split `{config.split}`; backbones {', '.join(backbones)}; fine-tuning seeds "
        f"{tuple(config.seeds)}, probe seeds {tuple(config.probe.seeds)}; label-fraction schedule "
        f"'{config.finetune.schedule}'. Cells: `{config.cells_dir}/<backbone>/<cell>/` "
        "(`study.json` lists each cell's config and overrides).",
        "",
        "Test metrics are those of each run's checkpoint with the lowest validation loss, scored "
        "once on the test split. Per run, Dice is the mean over test scans with lesions and FPV / "
        "FNV (mL) / HD95 (mm) are means over the test scans (`metrics.summarize`; FNV as autoPET I "
        "aggregates it: 0 on a tumour-free scan; each run's `test/summary.json` also has autoPET "
        "III/IV's, over the scans with lesions, as `mean_fnv_ml_autopet3`); the tables give "
        "their mean ± standard deviation (population) over seeds, the mean alone for one seed. "
        "One row per run and seed: `results.csv`.",
        "",
    ]
    if tuned:
        lines += ["## Fine-tuning", "",
                  *head("backbone", "init", "labels", "seeds", "Dice", "FPV mL", "FNV mL, autoPET I", "HD95 mm",
                        "lesion F1"),
                  *[f"| {e['backbone']} | {'MAE joint' if e['init'] == 'mae' else 'scratch'} | "
                    f"{e['fraction']:g}% | {_seeds_text(e)} | {_ms(e['mean_dice'])} | "
                    f"{_ms(e['mean_fpv_ml'], 2)} | {_ms(e['mean_fnv_ml'], 2)} | "
                    f"{_ms(e['mean_hd95_mm'], 1)} | {_ms(e['lesion_f1'])} |" for e in tuned], ""]
    if probes:
        lines += ["## k-shot linear probing (frozen MAE features, a 1x1x1 head)", "",
                  *head("backbone", "features", "k", "seeds", "Dice", "FPV mL", "FNV mL, autoPET I", "HD95 mm",
                        "lesion F1"),
                  *[f"| {e['backbone']} | {'joint PET+CT MAE' if e['mode'] == 'joint' else 'PET-only + CT-only MAE'} | "
                    f"{e['k']} | {_seeds_text(e)} | {_ms(e['mean_dice'])} | {_ms(e['mean_fpv_ml'], 2)} | "
                    f"{_ms(e['mean_fnv_ml'], 2)} | {_ms(e['mean_hd95_mm'], 1)} | {_ms(e['lesion_f1'])} |"
                    for e in probes], ""]
    if maes:
        rows = {(r["backbone"], r["setting"]): r for r in results["rows"] if r["kind"] == "pretrain"}
        lines += ["## MAE pretraining", "",
                  *head("backbone", "modality", "steps", "validation loss (lower is better)"),
                  *[f"| {e['backbone']} | {e['modality']} | "
                    f"{rows[(e['backbone'], e['setting'])].get('steps') or 'n/a'} | "
                    f"{_ms(e['val_loss'], 4)} |" for e in maes], ""]
    lines += ["## The paper's claims, as measured here", "", *_study_reading(settings, backbones), ""]
    if not_done:
        lines += ["## Not finished", "",
                  *[f"- `{e['cell'].name}`: {e['status']}{' (' + e['detail'] + ')' if e['detail'] else ''}"
                    for e in not_done], ""]
    lines += ["## Figures", ""]
    if tuned:
        lines.append("- Test Dice against the label fraction (± std over seeds): "
                     "![](figures/label_efficiency.png)")
    if bars:
        lines.append("- Test Dice per setting: ![](figures/dice_per_setting.png)")
    lines.append("- Learning curves (fine-tuning: first seed): ![](figures/learning_curves.png)")
    if "mae_reconstruction.png" in copied:
        lines.append(f"- MAE reconstruction ({copied['mae_reconstruction.png']}): "
                     "![](figures/mae_reconstruction.png)")
    if "segmentation_overlay.png" in copied:
        lines.append(f"- Segmentation overlay ({copied['segmentation_overlay.png']}): "
                     "![](figures/segmentation_overlay.png)")
    lines.append("")
    path = os.path.join(workdir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
