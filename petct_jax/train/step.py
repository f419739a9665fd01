"""The jitted train and eval steps, shared by every task.

The train state is a plain pytree, `{"step", "params", "opt_state", "rng"}`, with
parameters as a pure dict (what `nnx.state(model, nnx.Param).to_pure_dict()` gives),
so Orbax saves it and any device layout restores it. A task supplies
`loss_fn(model, batch, key, train) -> (loss, aux_metrics)` (`train=False` when scoring
validation batches: no dropout or drop-path); the step rebuilds the NNX
model from the parameters with `nnx.merge`, which is cheaper under `jax.jit` than
`nnx.jit` and keeps the step a pure function.

Randomness (masks, dropout) comes from `fold_in(rng, step)`: a step is reproducible
from the state alone, which is what makes a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from petct_jax.train import mesh as mesh_lib

LossFn = Callable[[nnx.Module, dict, jax.Array, bool], tuple[jax.Array, dict]]


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, params as a pure dict, the rest of the state: RNG streams etc.)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def merge_model(graphdef: nnx.GraphDef, params: dict, rest: nnx.State, key: jax.Array | None = None
                ) -> nnx.Module:
    model = nnx.merge(graphdef, params, rest, copy=True)
    if key is not None and jax.tree.leaves(rest):
        nnx.reseed(model, dropout=key)
    return model


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules=(), min_fsdp_size: int = 2 ** 18):
    """Parameters and optimizer moments by the path rules; step and RNG replicated."""
    return {
        "step": mesh_lib.replicated(mesh),
        "rng": mesh_lib.replicated(mesh),
        "params": mesh_lib.tree_shardings(state["params"], mesh, rules, min_fsdp_size),
        "opt_state": mesh_lib.tree_shardings(state["opt_state"], mesh, rules, min_fsdp_size),
    }


def step_key(state: dict) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, loss_fn: LossFn,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    accum_steps: int = 1, skip_nonfinite: bool = False) -> Callable:
    """Build `step(state, batch) -> (state, metrics)` (not yet jitted).

    `accum_steps` > 1 splits the batch into that many micro-batches whose gradients are
    averaged (lax.scan), so a large global batch fits in memory. With
    `skip_nonfinite`, a step whose loss or gradient is not finite leaves parameters
    and optimizer state unchanged (the step counter still advances past the batch).
    """

    def grads_of(params, batch, key):
        def f(p):
            return loss_fn(merge_model(graphdef, p, rest, key), batch, key, True)
        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, aux, grads

    def step(state, batch):
        key = step_key(state)
        params = state["params"]
        if accum_steps == 1:
            loss, aux, grads = grads_of(params, batch, key)
        else:
            # Micro-batch i takes rows i, i+A, i+2A, ...: the batch is split over devices in
            # contiguous blocks, so each device holds its own rows of every micro-batch and no
            # data moves. (Reshaping to (A, B/A) instead gave each micro-batch to a subset of
            # the devices: XLA all-gathered the batch and every device did A times the work.)
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(
                    x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch)
            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params, first, key))

            def body(total, inputs):
                i, mb = inputs
                out = grads_of(params, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, total, out), None

            total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
            loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, total)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_params = keep(new_params, params)
            opt_state = keep(opt_state, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": new_params,
                     "opt_state": opt_state, "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "finite": finite, **aux}
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, loss_fn: LossFn) -> Callable:
    """`eval_step(params, batch, key) -> (loss, aux)`; deterministic for a given key."""

    def eval_step(params, batch, key):
        return loss_fn(merge_model(graphdef, params, rest), batch, key, False)

    return eval_step
