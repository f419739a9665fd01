"""Config files with variants and overrides, and the `petct` dispatcher."""

import subprocess
import sys

import pytest

from petct_jax import cli
from petct_jax.config import apply_overrides, resolve, split_overrides
from petct_jax.errors import PetctError


def test_variants_select_backbone_modality_and_ablations():
    c = resolve("configs/pretrain.py:swin_base,pet,token,vw0")
    assert (c.model.name, c.model.preset) == ("swin_unetr", "base")
    assert c.optim.lr == 1e-4 and c.data.channels == ("pet",)
    assert c.mae.imputation == "token" and c.mae.visible_weight == 0.0
    d = resolve("configs/pretrain.py")
    assert (d.model.name, d.optim.lr, d.batch_size, d.data.patch) == ("plain_unet", 5e-4, 16, (96, 128, 128))
    assert d.mae.block == (12, 16, 16) and d.mae.ratio == 0.5 and d.mae.per_channel


def test_overrides_are_typed_and_checked():
    c = resolve("configs/pretrain.py:tiny", ["optim.lr=1", "data.patch=16,16,16",
                                             "mae.per_channel=False", "store=/data/s"])
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.data.patch == (16, 16, 16) and c.mae.per_channel is False and c.store == "/data/s"
    with pytest.raises(PetctError, match="optim.lrr: no such setting"):
        apply_overrides(c, ["optim.lrr=1"])
    with pytest.raises(PetctError, match="batch_size"):
        apply_overrides(c, ["batch_size='many'"])
    with pytest.raises(PetctError, match="no variant"):
        resolve("configs/pretrain.py:nonsense")
    with pytest.raises(PetctError, match="no such config file"):
        resolve("configs/missing.py")


def test_packaged_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = resolve("pretrain.py:tiny")
    assert by_name == resolve("configs/pretrain.py:tiny")
    assert by_name.model.name == "plain_unet"
    assert resolve("pretrain.py:tiny", ["batch_size=3"]).batch_size == 3
    with pytest.raises(PetctError, match="no such config file 'pretrain.pyy'.*finetune.py, "
                                         "pretrain.py, probe.py, study.py"):
        resolve("pretrain.pyy")
    # A file the user names wins over the packaged config of the same name.
    (tmp_path / "pretrain.py").write_text(
        "import ml_collections\n"
        "def get_config(arg):\n    return ml_collections.ConfigDict({'arg': arg})\n")
    assert resolve("pretrain.py:mine").arg == "mine"
    with pytest.raises(PetctError, match="no such config file 'elsewhere/pretrain.py'"):
        resolve("elsewhere/pretrain.py")


def test_split_overrides_accepts_both_spellings():
    rest, ov = split_overrides(["--workdir", "w", "--config.a=1", "--config.b", "2"])
    assert rest == ["--workdir", "w"] and ov == ["a=1", "b=2"]


def test_cli_lists_commands_and_rejects_unknown():
    out = subprocess.run([sys.executable, "-m", "petct_jax.cli", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "petct_jax.cli", "no-such-command"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_importing_the_cli_does_not_import_jax_or_torch():
    code = "import sys, petct_jax.cli; print('jax' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
