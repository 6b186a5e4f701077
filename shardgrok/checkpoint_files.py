"""Checkpoint files a crash cannot leave half-written, and a clear error for a damaged one.

A sharded optimizer's state exists nowhere else: a job killed while ``torch.save`` writes over
the last good checkpoint loses the whole run. :func:`save_checkpoint` writes a temporary file
next to the target, flushes it to disk (``fsync``) and renames it over the target, which POSIX
makes atomic: a reader finds the previous checkpoint or the new one, never a mix. The folder is
fsynced too, so the rename itself survives a power cut. (torch.distributed.checkpoint, for
FSDP, writes its ``.metadata`` file last: a checkpoint cut short there has none, and
``dcp.load`` refuses it.)

:func:`load_checkpoint` is ``torch.load`` (CPU, ``weights_only=True`` by default) whose error
for a truncated or foreign file names the file and says what it is.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import tempfile
from typing import Any

import torch


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically: the file at ``path`` is either the previous one
    or all of ``obj``, whatever happens during the write (a crash, a kill, a full disk). The
    temporary file (``.<name>.tmp-*`` in the same folder) is removed when the write fails."""
    path = pathlib.Path(path)
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"save_checkpoint: the folder of path {str(path)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: pathlib.Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    weights_only: bool = True) -> Any:
    """``torch.load(path, map_location, weights_only)``; a file that is truncated, empty or not
    written by ``torch.save`` raises ``ValueError`` naming it (the cause chained)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {str(path)!r}")
    size = path.stat().st_size
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # whole, but holds a class weights_only refuses
            raise ValueError(f"load_checkpoint: {str(path)!r} holds objects that "
                             "weights_only=True does not load; for a file you trust, pass "
                             f"weights_only=False ({_first_line(e)})") from e
        raise _damaged(path, size, e) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _damaged(path, size, e) from e


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _damaged(path: pathlib.Path, size: int, e: Exception) -> ValueError:
    return ValueError(f"load_checkpoint: {str(path)!r} ({size} bytes) is not a whole "
                      f"checkpoint: it is truncated, damaged or not written by torch.save "
                      f"({_first_line(e)})")
