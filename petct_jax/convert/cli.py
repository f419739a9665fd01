"""`petct convert`: weights between PyTorch (nnU-Net, MONAI) and petct-jax.

    petct convert torch2jax --arch plain_unet --in nnunet_v2_mim_best.pth --out converted/
        [--kwargs-json '{"num_classes": 2}'] [--overwrite]
    petct convert jax2torch --in converted/ --out weights.safetensors   (or weights.pth)

torch2jax writes `model.json` (arch + constructor arguments) and an Orbax checkpoint of the
parameters under `params/`; `petct_jax.convert.load_converted(dir)` rebuilds the model.
jax2torch reads such a folder (`petct_jax.convert.load_model`) and writes a state_dict that
loads with `load_state_dict(strict=True)` into the PyTorch twin.
"""

from __future__ import annotations

import argparse
import json
import math

from petct_jax.errors import PetctError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    t2j = sub.add_parser("torch2jax", help="PyTorch weights file -> converted JAX model directory")
    t2j.add_argument("--arch", required=True,
                     help="plain_unet, resenc_unet or swin_unetr")
    t2j.add_argument("--in", dest="src", required=True,
                     help=".pth/.pt (loaded with weights_only=True), .safetensors or .npz: a "
                          "state_dict or a checkpoint holding one")
    t2j.add_argument("--out", required=True, help="directory to write (model.json + params/)")
    t2j.add_argument("--kwargs-json", default="{}",
                     help="constructor arguments, torch names (JSON object); by default read "
                          "off the weights where possible")
    t2j.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
    j2t = sub.add_parser("jax2torch", help="JAX model (converted directory) -> PyTorch weights")
    j2t.add_argument("--in", dest="src", required=True, help="converted model directory")
    j2t.add_argument("--out", required=True, help="F.safetensors or F.pth")


def run(args: argparse.Namespace) -> int:
    from petct_jax import convert

    if args.direction == "torch2jax":
        try:
            kwargs = json.loads(args.kwargs_json)
        except json.JSONDecodeError as e:
            raise PetctError(f"--kwargs-json is not valid JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise PetctError("--kwargs-json must be a JSON object")
        model = convert.from_torch(args.src, arch=args.arch, **kwargs)
        # the network's own record of its arguments, else what was given (checked on save)
        config = getattr(model, "config", None)
        out = convert.save_converted(model, args.arch, kwargs if config is None else config,
                                     args.out, overwrite=args.overwrite)
        print(f"{args.arch}: {_n_params(model):,} parameters from {args.src} -> {out}")
        return 0

    model = convert.load_model(args.src)
    state = convert.to_torch(model)
    out = convert.save_state_dict(state, args.out)
    print(f"{type(model).__name__}: {len(state)} state_dict keys from {args.src} -> {out}")
    return 0


def _n_params(model) -> int:
    import jax
    from flax import nnx

    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
