"""The `petct` command line: one entry point, one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`.
A module is imported only when its subcommand runs, so `petct --help` and the
data tools start without importing JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from petct_jax.config import split_overrides
from petct_jax.errors import PetctError

# name -> (module, one-line help). Only subcommands that work are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("petct_jax.demo", "The whole pipeline on a synthetic cohort: phantoms, store, MAE, fine-tuning, probing, report."),
    "phantoms": ("petct_jax.phantoms", "Generate a digital whole-body FDG PET/CT cohort (AutoPET or nnU-Net layout)."),
    "preprocess": ("petct_jax.preprocessing.preprocess", "Harmonize raw PET/CT cohorts into a TensorStore zarr3 store."),
    "export": ("petct_jax.preprocessing.export", "Write a harmonized case back to NIfTI (pet, ct, seg) with correct affines."),
    "store-info": ("petct_jax.preprocessing.store_info", "Summarize a store: cases, cohorts, labels, lesions, bytes."),
    "pretrain": ("petct_jax.mae.pretrain", "MAE-pretrain a UNet backbone on a store (--config configs/pretrain.py:VARIANT)."),
    "convert": ("petct_jax.convert.cli", "Convert weights between PyTorch (nnU-Net, MONAI) and petct-jax."),
    "predict": ("petct_jax.downstream.predict", "Segment lesions in new PET/CT scans with a fine-tuned model; writes NIfTI masks on the input PET grid."),
    "evaluate": ("petct_jax.downstream.evaluate", "Score predicted lesion masks against ground truth: Dice, FPV, FNV, HD95, detection."),
    "finetune": ("petct_jax.downstream.finetune", "Fine-tune a backbone for lesion segmentation (from an MAE run, converted weights, or scratch)."),
    "probe": ("petct_jax.downstream.probe", "k-shot linear probing of frozen pretrained features (joint or separated PET/CT)."),
    "study": ("petct_jax.study", "The paper's experiment grid (MAE, fine-tuning at label fractions, probes, seeds): resumable cells, one report."),
}
# Commands that run networks: on a CPU run they restart once with huge pages
# (petct_jax/hugepages.py; a CPU training step is ~3x faster with them). The data tools start
# straight away.
HEAVY_COMMANDS = ("demo", "pretrain", "finetune", "probe", "predict", "study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petct", description="Whole-body FDG PET/CT foundation model in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`petct ARGS`; with `argv` given (tests, other programs) the process is never restarted."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage or the error, and exits
    name = argv[0]
    if from_command_line:
        from petct_jax.cpu_process import prepare_cpu_process

        prepare_cpu_process(huge_pages=name in HEAVY_COMMANDS)
    if name in HEAVY_COMMANDS and name not in ("study", "demo"):  # these cache in their workdir
        from petct_jax.compile_cache import enable_compile_cache

        enable_compile_cache()
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"petct {name}", description=help_text)
    module.add_arguments(parser)
    try:
        rest, overrides = split_overrides(argv[1:])
    except PetctError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if overrides and not hasattr(args, "config"):
        parser.error(f"petct {name} takes no --config overrides")
    args.config_overrides = overrides
    try:
        return int(module.run(args) or 0)
    except PetctError as e:
        print(f"petct {name}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 143 / 130: a run stopped by SIGTERM / Ctrl-C (preemption.py)


if __name__ == "__main__":
    sys.exit(main())
