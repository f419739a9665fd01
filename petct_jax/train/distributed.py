"""Multi-host start-up: join the other processes of a job before JAX looks for devices.

A training command calls `initialize()` first thing. It calls
`jax.distributed.initialize()` only when the environment says this process is one of
several, so the same command runs unchanged on a laptop, one GPU box, a SLURM job or a
Cloud TPU pod slice:

- `PETCT_COORDINATOR=host:port`, `PETCT_NUM_PROCESSES=n`, `PETCT_PROCESS_ID=i`: explicit
  (several processes on one machine, or any launcher of your own; `launch/local.sh`).
- SLURM with more than one task in the job step (`srun`, `SLURM_NTASKS` > 1): JAX reads
  the coordinator, process count and id, and the local GPU (`SLURM_LOCALID`) from SLURM.
  A plain `python` in an `sbatch`/`salloc` shell is not a job step: it stays one process.
- Cloud TPU VM with several workers (GCE: the `worker-network-endpoints` metadata, GKE:
  `TPU_WORKER_HOSTNAMES`): JAX finds the coordinator itself.
- `PETCT_DISTRIBUTED=1` forces the call with JAX's own cluster detection (Open MPI, k8s,
  ...; `launch/tpu_vm.sh` sets it); `PETCT_DISTRIBUTED=0` turns all of this off.

Never in Grain's worker processes: they are started by `multiprocessing` (spawn) and
re-import modules, and a second `initialize()` there would try to join the job as an
extra process. They are recognised by having a multiprocessing parent.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
from typing import Callable, Mapping

from petct_jax.errors import PetctError

_ON = ("1", "true", "yes", "on", "always")
_OFF = ("0", "false", "no", "off", "never")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the job: `kind` and the keyword arguments of
    `jax.distributed.initialize` (empty: JAX detects the cluster itself)."""

    kind: str
    kwargs: dict


def _int(environ: Mapping[str, str], name: str) -> int:
    text = environ.get(name)
    if text is None:
        raise PetctError(f"PETCT_COORDINATOR is set but {name} is not: set PETCT_COORDINATOR, "
                         "PETCT_NUM_PROCESSES and PETCT_PROCESS_ID together")
    try:
        return int(text)
    except ValueError:
        raise PetctError(f"{name}={text!r} is not an integer") from None


def _gce_tpu_workers() -> int:
    """Workers of this Cloud TPU slice from the GCE metadata server (1 when not a TPU VM)."""
    if not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):
        return 1  # no TPU chips: do not wait on a metadata server that is not there
    import urllib.request
    url = ("http://" + os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
           + "/computeMetadata/v1/instance/attributes/worker-network-endpoints")
    try:
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 1
    return len([w for w in text.split(",") if w.strip()])


def detect(environ: Mapping[str, str] | None = None,
           tpu_workers: Callable[[], int] = _gce_tpu_workers) -> Launch | None:
    """The launch this environment describes, or None for a single process."""
    env = os.environ if environ is None else environ
    mode = env.get("PETCT_DISTRIBUTED", "auto").strip().lower()
    if mode in _OFF:
        return None
    if mode not in _ON and mode != "auto":
        raise PetctError(f"PETCT_DISTRIBUTED={mode!r}: expected auto, 1 or 0")
    if env.get("PETCT_COORDINATOR"):
        n, i = _int(env, "PETCT_NUM_PROCESSES"), _int(env, "PETCT_PROCESS_ID")
        if not 0 <= i < n:
            raise PetctError(f"PETCT_PROCESS_ID={i} is not in [0, PETCT_NUM_PROCESSES={n})")
        if n == 1:
            return None
        return Launch("explicit", {"coordinator_address": env["PETCT_COORDINATOR"],
                                   "num_processes": n, "process_id": i})
    if mode in _ON:
        return Launch("cluster", {})
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        # SLURM_STEP_NODELIST exists only inside a job step (srun), which is also what
        # JAX's SLURM detection needs; the batch shell itself is one process.
        if "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:
            return Launch("slurm", {})
        print(f"petct: SLURM job with SLURM_NTASKS={env['SLURM_NTASKS']} but not in an srun "
              "step: running as a single process (launch with srun for multi-process)",
              file=sys.stderr)
        return None
    hostnames = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
    if hostnames is not None:
        return Launch("tpu", {}) if "," in hostnames else None
    if tpu_workers() > 1:
        return Launch("tpu", {})
    return None


def in_worker_process() -> bool:
    """True inside a multiprocessing child (Grain's `mp_prefetch` workers)."""
    return multiprocessing.parent_process() is not None


def initialize(environ: Mapping[str, str] | None = None) -> str | None:
    """Join the job's other processes when there are any; returns the launch kind or None.

    Call before anything asks JAX for devices. Idempotent; a no-op in worker processes.
    """
    if in_worker_process():
        return None
    launch = detect(environ)
    if launch is None:
        return None
    import jax
    if jax.distributed.is_initialized():
        return launch.kind
    # Cross-process collectives on CPU go through gloo (the default since jax 0.4.3x;
    # set it where an older or newer default says "none").
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**launch.kwargs)
    return launch.kind
