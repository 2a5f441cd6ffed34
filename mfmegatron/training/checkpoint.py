"""Atomic training checkpoints with megatron ``dist_checkpointing`` and a ``latest`` pointer.

Layout under ``output_dir/checkpoints``::

    step_00000100/          a complete dist checkpoint (model, EMA, optimizer, fake, state)
    step_00000200.partial/  a save in progress (or one that crashed): never loaded, cleaned up
    latest                  text file naming the newest complete checkpoint

A save writes into ``step_N.partial``, then rank 0 renames it to ``step_N`` and replaces
``latest`` (write to a temporary file, then ``os.replace``), so a crash at any point leaves the
previous checkpoint and pointer intact. Tensors are stored per parameter with global shapes, so a
checkpoint loads at any tensor/pipeline/data-parallel layout.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch.distributed as dist

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
# Set to a step number to SIGKILL every rank in the middle of that step's save (tests only).
KILL_DURING_SAVE = "MFMEGATRON_KILL_DURING_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit: one line saying which and why."""


def step_directory(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def save_checkpoint(root: Path, step: int, sharded_state_dict: dict, keep: int,
                    files: dict[str, str] | None = None) -> Path:
    """Saves atomically (every rank calls it); returns the final directory. ``files``: name ->
    text of small files to write beside megatron's (rank 0, before the checkpoint is published)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = step_directory(root, step)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict, str(partial))
    if rank == 0:
        for name, text in (files or {}).items():
            (partial / name).write_text(text)
    dist.barrier()
    if os.environ.get(KILL_DURING_SAVE) == str(step):
        # Fault injection (tests): die after the data is written, before it is published.
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        if final.exists():  # a re-run of the same step after a resume
            shutil.rmtree(final)
        os.replace(partial, final)
        pointer_tmp = root / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / LATEST)
        _remove_old(root, keep, current=final)
    dist.barrier()
    return final


def _remove_old(root: Path, keep: int, current: Path) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX))
    for path in complete[: max(0, len(complete) - keep)]:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)


def remove_partial_saves(root: Path) -> list[str]:
    """Leftovers of interrupted saves (rank 0 only); returns their names for the log."""
    removed = []
    for path in Path(root).glob(f"step_*{PARTIAL_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def load_common_state(path: Path) -> dict[str, Any]:
    """The non-tensor part of a checkpoint (read before building the layout to load into)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {_root_cause(error)}") from error


def load_checkpoint(path: Path, sharded_state_dict: dict) -> dict[str, Any]:
    """Loads ``path`` into the given sharded layout (every rank calls it)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(sharded_state_dict, str(path))
    # megatron raises several kinds; torch's CheckpointException derives from BaseException.
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"cannot load checkpoint {path}: {_root_cause(error)}") from error


def _root_cause(error: BaseException) -> str:
    """The first line of the underlying failure (torch wraps per-rank failures)."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
