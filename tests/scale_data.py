"""Run by test_scale.py as one of two processes (2 CPU devices each) joined on localhost.

    PETCT_COORDINATOR=localhost:PORT PETCT_NUM_PROCESSES=2 PETCT_PROCESS_ID=i \
    JAX_NUM_CPU_DEVICES=2 python tests/scale_data.py STORE OUT

Joins through `petct_jax.train.distributed.initialize()`, reads this host's share of two
global batches of 4 from the store (case ids and global sample indices included),
assembles each into a global jax.Array on a 4-device mesh, gathers it back from both
processes, and writes OUT/process_<i>.npz: local images, ids, indices, the gathered global
images, and the process's view of the job (process index/count, device counts).
"""

import os
import sys

import numpy as np

DATA = {"patch": (16, 16, 16), "zoom_prob": 0.0}


def main(store: str, out: str) -> None:
    from petct_jax.train import distributed
    kind = distributed.initialize()

    import jax
    from jax.experimental import multihost_utils

    from petct_jax.data.pipeline import global_batch, make_patch_iterator
    from petct_jax.train import mesh as mesh_lib

    it = make_patch_iterator(store, None, DATA, seed=0,
                             batch_size=4, task="mae", with_ids=True)
    mesh = mesh_lib.make_mesh(-1, 1)
    rows: dict[str, list] = {"image": [], "case": [], "index": [], "gathered": []}
    for _ in range(2):
        batch = next(it)
        glob = global_batch(batch, mesh)
        rows["image"].append(batch["image"])
        rows["case"].append(batch["case"])
        rows["index"].append(batch["index"])
        rows["gathered"].append(np.asarray(multihost_utils.process_allgather(glob["image"], tiled=True)))
        assert glob["image"].shape[0] == 4 and not glob["image"].is_fully_addressable
    i = jax.process_index()
    np.savez(os.path.join(out, f"process_{i}.npz"), kind=kind, process_index=i,
             process_count=jax.process_count(), devices=jax.device_count(),
             local_devices=jax.local_device_count(), **{k: np.stack(v) for k, v in rows.items()})
    multihost_utils.sync_global_devices("scale_data done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
