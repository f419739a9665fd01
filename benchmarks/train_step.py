"""Training step: ours (jitted JAX step) vs the PyTorch reference, MAE pretraining and fine-tuning.

Reference (what the paper's code runs): nnU-Net's `PlainConvUNet` from
dynamic_network_architectures, the MAE loss restated from method.md (per-channel 12x16x16
block masks with probability 0.5, masked input x * (1 - mask), MSE over masked voxels +
0.2 x MSE over visible voxels), `torch.optim.AdamW` (lr 5e-4, wd 1e-5), gradient-norm clip
1.0; AMP fp16 with a GradScaler on GPU, float32 on CPU. Fine-tuning: the same network with
MONAI's `DiceCELoss(softmax=True, to_onehot_y=True)`.

Ours: the same network config built from `configs/pretrain.py` / `configs/finetune.py`
(`petct_jax.mae.pretrain.build_model` + `mae_loss_fn`, `petct_jax.downstream.common.make_loss_fn`),
`petct_jax.train.optim.make_optimizer`, the step of `petct_jax.train.step.make_train_step`
jitted with the state donated, as `petct pretrain` / `petct finetune` run it; bfloat16 compute
on GPU, float32 on CPU. Both sides start from the same weights (ours converted with
`petct_jax.convert.to_torch`), and the MAE loss of one forward on the same input and mask is
compared.

Timing: after `--warmup` steps each, `--steps` steps taken in turns (ours, reference, ours, ...)
so that load from other processes hits both alike; the fastest step of each is reported (the
least disturbed), the median too. Voxels/s = batch x crop voxels / step time.

    python benchmarks/train_step.py [--batch 2] [--crop 32 64 64] [--net paper|small]
                                    [--steps 5] [--warmup 1] [--no-finetune] [--xla-conv]

Both sides run in one process; on Linux it restarts itself once with glibc's malloc on
transparent huge pages (`--no-huge-pages` keeps the default allocator; see
`petct_jax.hugepages`: without them XLA's memory-bound ops on CPU crawl; `petct` does the
same for its training and inference commands).

`--xla-conv` also times our MAE step with `lax.conv_general_dilated` for every convolution
(the path before petct_jax/models/conv_cpu.py). The GPU size of the paper is
`--batch 2 --crop 96 128 128` (batch per GPU). Ends with one line holding one JSON object
(`speedup` = our voxels/s / reference voxels/s for the MAE step; `finetune_speedup` the same
for fine-tuning), with `tflop_per_step` (XLA's count for our step with one convolution per
layer; both sides do the same arithmetic), each side's TFLOP/s, its model FLOP utilisation
(`ours_mfu`, `ref_mfu`) on accelerators with a known peak (`PEAK_TFLOPS`), and on a GPU each
side's peak memory (`ours_peak_gib`: JAX's allocator high-water mark, cumulative over the run;
`ref_peak_gib`: torch's, per task).
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Measure the checkout this file belongs to, whatever `pip install -e` points at.
_sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np
from petct_jax.cpu_process import prepare_cpu_process
from petct_jax.hugepages import huge_pages_on  # noqa: E402

NETS = {
    # the paper's network (configs/pretrain.py:plain_unet): 6 stages 32..320, 31.2M parameters
    "paper": {},
    # 4 stages 16..128, for a quick look on a laptop
    "small": dict(n_stages=4, features_per_stage=(16, 32, 64, 128), strides=(1, 2, 2, 2)),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"))
    parser.add_argument("--net", choices=sorted(NETS), default="paper")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compiling")
    parser.add_argument("--no-finetune", action="store_true", help="MAE step only")
    parser.add_argument("--remat", choices=("none", "stage", "stage_dots"), default="none",
                        help="our model's rematerialisation policy (config.model.remat)")
    parser.add_argument("--trace", metavar="DIR", default="",
                        help="write a jax.profiler trace of 3 of our MAE steps into DIR")
    parser.add_argument("--xla-conv", action="store_true",
                        help="also time our MAE step with XLA's 3D convolution")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="keep glibc's default malloc (no re-exec with transparent huge pages)")
    return parser.parse_args()


# ---------------------------------------------------------------- configs and our side


def make_config(task: str, args: argparse.Namespace, accelerator: bool):
    """configs/pretrain.py:plain_unet or configs/finetune.py:plain_unet,scratch at our size."""
    import importlib.util

    name = "pretrain" if task == "mae" else "finetune"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("plain_unet" if task == "mae" else "plain_unet,scratch")
    config.batch_size = args.batch
    config.data.patch = tuple(args.crop)
    config.model.dtype = "bfloat16" if accelerator else "float32"  # GPU and TPU alike
    config.model.remat = None if args.remat == "none" else args.remat
    config.total_steps = 1000
    config.optim.warmup_steps = 0
    for key, value in NETS[args.net].items():
        config.model.overrides[key] = value
    return config


def build_ours(task: str, config) -> tuple[Any, Callable, Any, Any, Callable]:
    """(model, jitted step, initial state, loss_fn, the step unjitted) for `task` ("mae" or "seg")."""
    import jax
    from flax import nnx

    from petct_jax.train import optim, step as step_lib

    if task == "mae":
        from petct_jax.mae.pretrain import build_model, mae_loss_fn
        model = build_model(config, nnx.Rngs(config.seed))
        loss_fn = mae_loss_fn(config.mae)
    else:
        from petct_jax.downstream import common
        try:
            from petct_jax.downstream.finetune import build_model
        except ImportError:  # fine-tuning module not there: the backbone with 2 classes
            from petct_jax.train.backbone import build_backbone
            build_model = lambda c, r: build_backbone(c.model, len(c.data.channels), 2, r)  # noqa: E731
        model = build_model(config, nnx.Rngs(config.seed))
        loss_fn = common.make_loss_fn(config.loss)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    graphdef, params, rest = step_lib.split_model(model)
    state = step_lib.init_state(params, tx, config.seed)
    raw_step = step_lib.make_train_step(graphdef, rest, loss_fn, tx, schedule)
    return model, jax.jit(raw_step, donate_argnums=0), state, loss_fn, raw_step


def step_flops(raw_step: Callable, state: Any, batch: Any) -> float | None:
    """FLOPs of one training step, from XLA's cost analysis of the lowered step with one
    convolution per layer (as an accelerator runs it; the CPU path's depth-tap decomposition
    computes some rows it drops, which would count). Nothing is compiled or allocated."""
    import jax

    from petct_jax.models.conv_cpu import use_impl
    from petct_jax.train.plan import xla_flops

    with use_impl("xla"):
        return xla_flops(jax.jit(raw_step).lower(state, batch))


# Dense BF16/FP16 tensor-core (MXU) peaks in TFLOP/s, from the vendors' datasheets, by the
# start of `jax.Device.device_kind`: model FLOP utilisation (MFU) = step FLOPs / time / peak.
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def peak_tflops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if device_kind.startswith(k)), None)


# ---------------------------------------------------------------- the reference side


def torch_twin(backbone: Any, device: str):
    """dynamic_network_architectures' PlainConvUNet holding our backbone's weights."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet as TorchUNet

    from petct_jax import convert

    cfg = backbone.config
    nn = torch.nn
    net = TorchUNet(
        input_channels=cfg["input_channels"], n_stages=cfg["n_stages"],
        features_per_stage=cfg["features_per_stage"], conv_op=nn.Conv3d,
        kernel_sizes=cfg["kernel_sizes"], strides=cfg["strides"],
        n_conv_per_stage=cfg["n_conv_per_stage"], num_classes=cfg["num_classes"],
        n_conv_per_stage_decoder=cfg["n_conv_per_stage_decoder"], conv_bias=cfg["conv_bias"],
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": cfg["norm_eps"], "affine": True},
        dropout_op=None, dropout_op_kwargs=None, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=cfg["deep_supervision"])
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in convert.to_torch(backbone).items()}
    net.load_state_dict(state, strict=True)
    return net.to(device).train()


def torch_block_mask(shape, block=(12, 16, 16), ratio=0.5, device="cpu"):
    """(B, C, Z, Y, X) float mask, one Bernoulli draw per block and channel (method.md)."""
    import torch

    b, c, *spatial = shape
    grid = [-(-s // k) for s, k in zip(spatial, block)]
    m = (torch.rand(b, c, *grid, device=device) < ratio).float()
    for axis, k in zip((2, 3, 4), block):
        m = m.repeat_interleave(k, dim=axis)
    return m[:, :, :spatial[0], :spatial[1], :spatial[2]].contiguous()


def torch_mae_loss(pred, x, mask, visible_weight: float = 0.2):
    err = (pred.float() - x) ** 2
    masked = (err * mask).sum() / mask.sum().clamp_min(1.0)
    visible = 1.0 - mask
    return masked + visible_weight * (err * visible).sum() / visible.sum().clamp_min(1.0)


def torch_step_fn(net, task: str, x, label, device: str, lr: float):
    """One reference training step (closure over the optimizer and scaler)."""
    import torch

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if task == "seg":
        from monai.losses import DiceCELoss
        dice_ce = DiceCELoss(softmax=True, to_onehot_y=True)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            if task == "mae":
                mask = torch_block_mask(x.shape, device=x.device)
                pred = net(x * (1.0 - mask))
                loss = torch_mae_loss(pred, x, mask)
            else:
                loss = dice_ce(net(x).float(), label)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        if amp:
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


# ---------------------------------------------------------------- timing


def synthetic_batch(task: str, batch: int, crop, seed: int = 0) -> dict[str, np.ndarray]:
    """Smooth-ish random 2-channel patches; for "seg" a few spherical lesions as labels."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, *crop, 2)).astype(np.float32)
    out = {"image": image}
    if task == "seg":
        zz, yy, xx = np.meshgrid(*[np.arange(n) for n in crop], indexing="ij")
        label = np.zeros((batch, *crop), np.int32)
        for b in range(batch):
            for _ in range(3):
                centre = [rng.integers(0, n) for n in crop]
                r = max(2, min(crop) // 6)
                label[b][(zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= r * r] = 1
        image[..., 0] += 2.0 * label
        out["label"] = label
    return out


def time_pair(ours: Callable[[], None], ref: Callable[[], None], steps: int
              ) -> tuple[list[float], list[float]]:
    """Step times of both sides, taken in turns."""
    t_ours, t_ref = [], []
    for _ in range(steps):
        for fn, times in ((ours, t_ours), (ref, t_ref)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return t_ours, t_ref


def run_task(task: str, args: argparse.Namespace, accelerator: bool, torch_device: str) -> dict:
    import jax
    import jax.numpy as jnp

    config = make_config(task, args, accelerator)
    model, step, state, loss_fn, raw_step = build_ours(task, config)
    backbone = model.backbone if task == "mae" else model
    data = synthetic_batch(task, args.batch, args.crop)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    voxels = args.batch * math.prod(args.crop)

    import torch
    net = torch_twin(backbone, torch_device)
    x_t = torch.from_numpy(data["image"].transpose(0, 4, 1, 2, 3).copy()).to(torch_device)
    label_t = (torch.from_numpy(data["label"][:, None].copy()).to(torch_device)
               if task == "seg" else None)

    result: dict[str, Any] = {}
    if task == "mae":
        # Same input, same mask, same weights: the losses of one forward must agree.
        from petct_jax.mae.masking import block_mask
        mask = block_mask(jax.random.key(3), data["image"].shape, tuple(config.mae.block),
                          config.mae.ratio, config.mae.per_channel)
        ours_loss = float(loss_of(model, batch["image"], mask))
        with torch.no_grad():
            mask_t = torch.from_numpy(np.asarray(mask).transpose(0, 4, 1, 2, 3).copy()).to(torch_device)
            ref_loss = float(torch_mae_loss(net(x_t * (1 - mask_t)), x_t, mask_t))
        result["loss_rel_diff"] = abs(ours_loss - ref_loss) / abs(ref_loss)

    flops = step_flops(raw_step, state, batch)
    t0 = time.perf_counter()
    # An executable of its own: a `use_impl` block (step_flops above, --xla-conv below) clears
    # JAX's caches on leaving, and a jitted step would be traced and compiled again after it.
    step = step.lower(state, batch).compile()
    holder = {"state": state}

    def ours_step() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    ours_step()
    result["compile_s"] = round(time.perf_counter() - t0, 2)
    ref_step = torch_step_fn(net, task, x_t, label_t, torch_device, float(config.optim.lr))
    if torch_device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        ours_step()
        ref_step()
    t_ours, t_ref = time_pair(ours_step, ref_step, args.steps)
    if args.trace and task == "mae":  # after timing, so the profiler costs the figures nothing
        with jax.profiler.trace(args.trace):
            for _ in range(3):
                ours_step()
        result["trace_dir"] = args.trace
    best_ours, best_ref = min(t_ours), min(t_ref)
    result.update({
        "ours_step_s": round(best_ours, 3), "ref_step_s": round(best_ref, 3),
        "ours_step_median_s": round(statistics.median(t_ours), 3),
        "ref_step_median_s": round(statistics.median(t_ref), 3),
        "ours_voxels_per_s": round(voxels / best_ours), "ref_voxels_per_s": round(voxels / best_ref),
        "speedup": round(best_ref / best_ours, 3),
        "speedup_median": round(statistics.median(t_ref) / statistics.median(t_ours), 3),
    })
    if flops:
        peak = peak_tflops(jax.devices()[0].device_kind)
        result["tflop_per_step"] = round(flops / 1e12, 4)
        for side, t in (("ours", best_ours), ("ref", best_ref)):
            result[f"{side}_tflop_per_s"] = float(f"{flops / t / 1e12:.3g}")
            if peak:
                result[f"{side}_mfu"] = round(flops / t / (peak * 1e12), 4)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # GPU/TPU: the allocator's high-water mark so far
        result["ours_peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
    if torch_device == "cuda":
        result["ref_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    if task == "mae" and args.xla_conv:
        from petct_jax.models import conv_cpu
        with conv_cpu.use_impl("xla"):  # compiled inside: it stays XLA's path after the block
            _, step_xla, state_xla, *_ = build_ours(task, config)
            step_xla = step_xla.lower(state_xla, batch).compile()
        holder_xla = {"state": state_xla}

        def xla_step() -> None:
            holder_xla["state"], metrics = step_xla(holder_xla["state"], batch)
            jax.block_until_ready(metrics["loss"])

        xla_step()
        t_new, t_xla = time_pair(ours_step, xla_step, max(2, args.steps // 2))
        result["ours_xla_conv_step_s"] = round(min(t_xla), 3)
        result["conv_cpu_speedup_in_step"] = round(min(t_xla) / min(t_new), 3)
    return result


def loss_of(model: Any, x, mask):
    """Our MAE loss of one forward with a given mask (no step, no gradients)."""
    import jax
    from flax import nnx

    from petct_jax.mae.loss import reconstruction_loss

    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, xx, m: reconstruction_loss(nnx.merge(graphdef, s)(xx, m), xx, m, 0.2))(
        state, x, mask)


def main() -> None:
    args = parse_args()
    prepare_cpu_process(huge_pages=not args.no_huge_pages)
    import jax
    import torch

    accelerator = jax.default_backend() != "cpu"
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # nnU-Net's setting: the fastest cuDNN algorithms
    voxels = args.batch * math.prod(args.crop)

    mae = run_task("mae", args, accelerator, torch_device)
    print(f"MAE step, batch {args.batch} x {tuple(args.crop)}: ours {mae['ours_step_s']} s "
          f"({mae['ours_voxels_per_s']} vox/s), reference {mae['ref_step_s']} s "
          f"({mae['ref_voxels_per_s']} vox/s), speedup {mae['speedup']}", flush=True)
    out: dict[str, Any] = {
        "benchmark": "train_step",
        "device": jax.devices()[0].device_kind, "torch_device": torch_device,
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "huge_pages": huge_pages_on(),
        "jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "net": args.net, "batch": args.batch, "crop": list(args.crop),
        "dtype_ours": "bfloat16" if accelerator else "float32", "remat": args.remat,
        "dtype_ref": "fp16 AMP" if torch_device == "cuda" else "float32",
        "voxels_per_step": voxels,
        **{k: v for k, v in mae.items()},
    }
    if not args.no_finetune:
        seg = run_task("seg", args, accelerator, torch_device)
        print(f"fine-tuning step: ours {seg['ours_step_s']} s, reference {seg['ref_step_s']} s, "
              f"speedup {seg['speedup']}", flush=True)
        out.update({f"finetune_{k}": v for k, v in seg.items() if k != "speedup"})
        out["finetune_speedup"] = seg["speedup"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
