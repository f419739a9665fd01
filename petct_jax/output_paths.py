"""Outputs never replace a command's inputs or a user's files.

Shared by the commands that write files the user names (`petct predict`, `petct export`,
`petct phantoms`):

- `refuse_output_over_inputs`: an output path that is, or resolves to (symlinks, `..`,
  hard links), one of the command's input files is refused before anything is read.
- `refuse_existing`: existing outputs are replaced only with `--overwrite`.
- `save_nifti`: written under a temporary name and renamed, never half a file.
- `read_record` / `write_record`: a small record of the files a command wrote into a folder
  (`.petct-outputs.json`), so that a later `--overwrite` removes what that command wrote
  earlier and nothing else a user keeps in the same folder.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from petct_jax.errors import PetctError

RECORD = ".petct-outputs.json"


def is_local(path: str) -> bool:
    """A path on this machine (not gs://, s3://, file:// ... which these checks cannot resolve)."""
    return "://" not in str(path)


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name the same file or folder: the same inode when both exist (hard
    links, bind mounts), else the same fully resolved path (an output not yet written)."""
    a, b = os.fspath(a), os.fspath(b)
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies below it, after resolving both."""
    p, f = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(folder))
    try:
        return os.path.commonpath([p, f]) == f
    except ValueError:  # different drives
        return False


def refuse_output_over_inputs(out: str | os.PathLike, inputs: Iterable[tuple[str, str | None]],
                              out_option: str = "--out") -> None:
    """PetctError when `out` is the same file as any input; `inputs` are (option, path) pairs,
    None paths (options not given) are skipped."""
    if not is_local(os.fspath(out)):
        return
    for option, path in inputs:
        if path is not None and is_local(os.fspath(path)) and same_path(out, path):
            raise PetctError(f"{out_option} {out} is the same file as {option} {path}: refusing to "
                             "overwrite an input")


def refuse_existing(paths: Iterable[str | os.PathLike], overwrite: bool, option: str = "--out") -> None:
    """PetctError naming the first of `paths` that exists, unless `overwrite`; a folder where a
    file is to go is refused either way (replacing it would delete what it holds)."""
    existing = [os.fspath(p) for p in paths if os.path.lexists(p)]
    for p in existing:
        if os.path.isdir(p) and not os.path.islink(p):
            raise PetctError(f"{option}: {p} is a folder; refusing to replace it with a file")
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise PetctError(f"{option}: {existing[0]} exists{more}; pass --overwrite to replace it")


def read_record(folder: str | os.PathLike, command: str) -> list[str]:
    """Names (relative to `folder`) that `command` recorded writing there; [] without a record.

    Names that would leave the folder (absolute, `..`) are dropped: a record is only trusted
    to point at files inside the folder it sits in.
    """
    path = os.path.join(os.fspath(folder), RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f).get(command, [])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError) as e:
        raise PetctError(f"{path}: unreadable record of earlier outputs ({type(e).__name__}: {e}); "
                         "remove it to continue") from None
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n and not os.path.isabs(n)
            and ".." not in n.replace("\\", "/").split("/")]


def write_record(folder: str | os.PathLike, command: str, names: Iterable[str]) -> None:
    """Record `names` as what `command` wrote in `folder` (atomic; other commands' entries kept)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict):
            record = {}
    except (OSError, ValueError):
        record = {}
    record[command] = sorted(set(names))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def remove_recorded(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Remove the regular files (or symlinks) `names` below `folder`, then the folders they leave
    empty up to `folder` (exclusive); returns the removed names. A folder that still holds
    anything (a user's file) is kept, and so is anything resolving outside `folder`."""
    folder = os.fspath(folder)
    removed, parents = [], set()
    for name in names:
        path = os.path.join(folder, name)
        # The entry itself must lie in the folder (a symlinked parent could lead elsewhere).
        if not is_within(os.path.dirname(path), folder):
            continue
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
            removed.append(name)
        parents.add(os.path.dirname(path))
    root = os.path.realpath(folder)
    for parent in sorted(parents, key=len, reverse=True):
        d = parent
        while os.path.realpath(d) != root and is_within(d, root):
            try:
                os.rmdir(d)  # only succeeds when empty
            except OSError:
                break
            d = os.path.dirname(d)
    return removed


def save_nifti(img, path: str) -> None:
    """nib.save under a temporary name in the same folder, then a rename: an interrupted write
    never leaves a half-written file under the final name (nor half of a file it replaces)."""
    import nibabel as nib

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ending = ".nii.gz" if path.endswith(".nii.gz") else ".nii"
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}{ending}")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
