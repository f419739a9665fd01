"""Linear probing: only the head trains (frozen backbones stay bit-identical, no gradient
reaches them), the separated PET-only / CT-only probe concatenates features, the
bottleneck option, k-shot sub-runs per seed with mean and spread, resume, and the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petct_jax.config import resolve
from petct_jax.downstream import weights
from petct_jax.downstream.probe import LinearProbe, load_backbones, probe
from petct_jax.train import restore

from conftest import REPO
from downstream_helpers import TINY_DATA, phantom_split, tiny_mae_run

CONFIG = os.path.join(REPO, "configs/probe.py")
RUN = ["total_steps=3", "ckpt.every_steps=3", "eval_every=3", "log_every=1", "preview_every=3",
       "eval.batch_windows=32", "eval.overlap=0.0", "k=2"]


@pytest.fixture(scope="module")
def maes(phantom_store, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mae"))
    return {m: tiny_mae_run(phantom_store, root, m) for m in ("joint", "pet", "ct")}


@pytest.fixture(scope="module")
def split_file(phantom_store, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("split") / "split.json")
    split = phantom_split(phantom_store, path)
    return path, split


def probe_config(variant, store, split, *extra):
    return resolve(f"{CONFIG}:{variant}", [f"store={store}", f"data.split={split}", *TINY_DATA,
                                           *RUN, *extra])


def _flat(tree):
    """{path of strings: array} (a checkpoint read without a target spells list indices as strings)."""
    return {tuple(map(str, k)): np.asarray(v) for k, v in weights.flatten(tree).items()}


def _mae_backbone(workdir):
    return _flat(restore.load_params(workdir)[1]["backbone"])


@pytest.fixture(scope="module")
def joint_run(phantom_store, maes, split_file, tmp_path_factory):
    """The joint probe through the CLI: seeds 0 and 1, 3 steps each."""
    from petct_jax import cli

    workdir = str(tmp_path_factory.mktemp("probe") / "joint")
    args = ["probe", "--config", f"{CONFIG}:tiny", "--workdir", workdir,
            f"--config.store={phantom_store}", f"--config.init={maes['joint']}",
            f"--config.data.split={split_file[0]}", "--config.seeds=(0,1)",
            *[f"--config.{o}" for o in TINY_DATA + RUN]]
    assert cli.main(args) == 0
    return workdir, args


def test_probe_trains_only_the_head(joint_run, maes):
    workdir, _ = joint_run
    mae = _mae_backbone(maes["joint"])
    for seed in (0, 1):
        sub = os.path.join(workdir, f"seed_{seed}")
        _, params, step = restore.load_params(sub, "latest")
        assert step == 3
        flat = _flat(params)
        body = {p[2:]: v for p, v in flat.items() if p[:2] == ("backbones", "0")}
        assert set(body) == set(mae)
        for p, v in body.items():
            np.testing.assert_array_equal(v, mae[p], err_msg=str(p))  # bit-identical
        head = {p: v for p, v in flat.items() if p[0] == "head"}
        assert set(head) == {("head", "kernel"), ("head", "bias")}
        assert head[("head", "kernel")].shape == (1, 1, 1, 4, 2)  # decoder width 4 -> 2 classes
        init = _flat(weights.pure_params(nnx.Conv(4, 2, (1, 1, 1), rngs=nnx.Rngs(seed))))
        assert not np.allclose(head[("head", "kernel")], init[("kernel",)])


def test_no_gradient_reaches_the_frozen_backbone(phantom_store, maes, split_file):
    config = probe_config("tiny", phantom_store, split_file[0], f"init={maes['joint']}")
    backbones, inputs, widths, _ = load_backbones(config)
    model = LinearProbe(backbones, inputs, widths, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 2))

    def f(p):
        return jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)

    grads = nnx.to_pure_dict(jax.jit(jax.grad(f))(params))
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads["backbones"]))
    assert any(np.asarray(g).any() for g in jax.tree.leaves(grads["head"]))


def test_k_shot_seeds_summary_and_table(joint_run, split_file, phantom_store):
    from petct_jax.store import Store

    workdir, _ = joint_run
    path, split = split_file
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["k"] == 2 and summary["seeds"] == [0, 1] and summary["mode"] == "joint"
    lesion_scans = {r["id"] for r in Store(phantom_store).records if r["lesion_count"]}
    dice = []
    for seed in (0, 1):
        sub = os.path.join(workdir, f"seed_{seed}")
        s = json.load(open(os.path.join(sub, "split.json")))
        # k = 2 patients with lesions from the training pool, one scan each.
        assert len(s["train"]) == 2 and set(s["train"]) <= set(split["train"]) & lesion_scans
        assert (s["val"], s["test"]) == (split["val"], split["test"])
        seed_summary = json.load(open(os.path.join(sub, "summary.json")))
        assert seed_summary["test"]["n_cases"] == 2
        assert seed_summary["head_in_channels"] == 4
        dice.append(seed_summary["test"]["mean_dice"])
        assert os.path.exists(os.path.join(sub, "test", "cases.csv"))
    stats = summary["stats"]["mean_dice"]
    assert stats["mean"] == pytest.approx(np.mean(dice)) and stats["std"] == pytest.approx(np.std(dice))
    table = open(os.path.join(workdir, "table.md")).read()
    assert "mean ± std" in table and len(table.splitlines()) == 5


def test_rerun_resumes_without_new_steps(joint_run, phantom_store, maes, split_file):
    workdir, args = joint_run
    overrides = [a.removeprefix("--config.") for a in args if a.startswith("--config.")]
    config = resolve(f"{CONFIG}:tiny", overrides)
    before = json.load(open(os.path.join(workdir, "summary.json")))
    again = probe(config, workdir)
    for seed in (0, 1):
        s = json.load(open(os.path.join(workdir, f"seed_{seed}", "summary.json")))
        assert s["resumed_from"] == 3 and s["steps"] == 3
    assert again["stats"] == before["stats"]


def test_separated_probe_concatenates_features(phantom_store, maes, split_file, tmp_path):
    config = probe_config("tiny,separate", phantom_store, split_file[0], f"init_pet={maes['pet']}",
                          f"init_ct={maes['ct']}", "seeds=(0,)", "eval.test=False")
    workdir = str(tmp_path / "sep")
    summary = probe(config, workdir)
    assert summary["mode"] == "separate"
    assert [b["channels"] for b in summary["backbones"]] == [["pet"], ["ct"]]
    assert summary["head_in_channels"] == 8  # 4 (PET decoder) + 4 (CT decoder)
    _, params, _ = restore.load_params(os.path.join(workdir, "seed_0"), "latest")
    flat = _flat(params)
    assert flat[("head", "kernel")].shape == (1, 1, 1, 8, 2)
    for i, m in enumerate(("pet", "ct")):
        mae = _mae_backbone(maes[m])
        for p, v in mae.items():
            np.testing.assert_array_equal(flat[("backbones", str(i)) + p], v, err_msg=f"{m} {p}")

    # The head sees [PET network(PET channel), CT network(CT channel)].
    backbones, inputs, widths, _ = load_backbones(config)
    assert inputs == [(0,), (1,)] and widths == [4, 4]
    model = LinearProbe(backbones, inputs, widths, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 2))
    feats = np.asarray(model.features(x))
    np.testing.assert_allclose(feats[..., :4], backbones[0].features(x[..., :1])["decoder"], rtol=1e-6)
    np.testing.assert_allclose(feats[..., 4:], backbones[1].features(x[..., 1:])["decoder"], rtol=1e-6)


def test_bottleneck_head_is_upsampled_trilinearly(phantom_store, maes, split_file):
    config = probe_config("tiny,bottleneck", phantom_store, split_file[0], f"init={maes['joint']}")
    backbones, inputs, widths, reports = load_backbones(config)
    assert widths == [8] and reports[0]["feature_shape"] == [4, 4, 4, 8]
    model = LinearProbe(backbones, inputs, widths, feature="bottleneck", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 16, 16, 16, 2))
    out = model(x)
    low = model.head(backbones[0].features(x)["bottleneck"])
    assert out.shape == (1, 16, 16, 16, 2)
    np.testing.assert_allclose(out, jax.image.resize(low, (1, 16, 16, 16, 2), "trilinear"), rtol=1e-5, atol=1e-6)
