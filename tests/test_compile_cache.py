"""The persistent compilation cache is on by default for the network commands
(petct_jax/compile_cache.py), where the user says, and off when told."""

import os
import subprocess
import sys

CODE = ("import sys, jax; from petct_jax.compile_cache import enable_compile_cache as e; "
        "d = e(*sys.argv[1:]); print(d, jax.config.jax_compilation_cache_dir)")


def _cache(*args, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("JAX_COMPILATION_CACHE_DIR", "PETCT_COMPILE_CACHE", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", CODE, *args], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_default_is_the_users_cache_directory(tmp_path):
    want = str(tmp_path / "petct_jax" / "xla")
    assert _cache(XDG_CACHE_HOME=str(tmp_path)) == [want, want]
    # a study's (or any caller's) own default, made absolute
    assert _cache("rel/jax_cache", XDG_CACHE_HOME=str(tmp_path))[1] == os.path.abspath("rel/jax_cache")


def test_the_users_settings_win(tmp_path):
    mine = str(tmp_path / "mine")
    # JAX's own variable: JAX applies it itself, and petct changes nothing
    assert _cache("elsewhere", JAX_COMPILATION_CACHE_DIR=mine) == [mine, mine]
    assert _cache("elsewhere", PETCT_COMPILE_CACHE=mine) == [mine, mine]
    assert _cache("elsewhere", PETCT_COMPILE_CACHE="off") == ["None", "None"]


def test_network_commands_turn_it_on(tmp_path):
    code = ("import sys, jax; from petct_jax import cli; import petct_jax.mae.pretrain as p; "
            "p.run = lambda args: print(jax.config.jax_compilation_cache_dir) or 0; "
            "sys.exit(cli.main(['pretrain', '--config', 'pretrain.py:tiny', '--workdir', 'w']))")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("JAX_COMPILATION_CACHE_DIR", "PETCT_COMPILE_CACHE")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "XDG_CACHE_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(tmp_path / "petct_jax" / "xla")
