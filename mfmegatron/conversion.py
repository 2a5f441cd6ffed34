"""Machinery shared by the checkpoint conversion CLIs (``tools/convert_flux.py``,
``tools/convert_hunyuan_image3.py``): one-line input errors, progress, lazily read safetensors,
safetensors shards with an index, and writing into a staging directory that only becomes the
output once complete.

torch, safetensors and megatron are imported lazily (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mfmegatron.config import report_user_error

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                         "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ConversionError(RuntimeError):
    """A problem with the command's inputs, reported as one line without a traceback."""


# --------------------------------------------------------------------------- small helpers


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024, as diffusers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES.get(name, name))  # "bf16" or a stored name such as "bfloat16"


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def log(message: str, quiet: bool = False) -> None:
    if not quiet and rank() == 0:
        print(message, file=sys.stderr, flush=True)


def require_empty_output(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(f"output {path} already exists and is not an empty directory")


def check_export_arguments(checkpoint: Path, output: Path, dry_run: bool) -> None:
    """What every ``export`` command checks before reading anything: the checkpoint exists, the
    output is free, and it runs in one process (it reads the checkpoint unsharded, whatever
    layout wrote it)."""
    if not checkpoint.exists():
        raise ConversionError(f"--checkpoint {checkpoint}: no such file or directory")
    if not dry_run:
        require_empty_output(output)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError(
            "export runs in one process (it reads the checkpoint unsharded, whatever layout wrote it); "
            "start it without torchrun"
        )


class Progress:
    """Tensor count and bytes, as a tqdm bar on rank 0 (nothing with --quiet or on other ranks)."""

    def __init__(self, total_bytes: int, description: str, quiet: bool):
        self.tensors, self.bytes = 0, 0
        self.bar = None
        if not quiet and rank() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, desc=description, unit="B", unit_scale=True,
                            mininterval=1.0, file=sys.stderr, dynamic_ncols=True)

    def update(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.tensors} tensors", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- reading safetensors


def _truncation(file: Path) -> str | None:
    """'N bytes, but its header describes M' when ``file`` is shorter than its header says."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
    except (struct.error, ValueError, OSError):
        return f"{size} bytes, too short for its own header" if size < 8 else None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_length + data_end
    return f"{size} bytes, but its header describes {expected}" if size < expected else None


def open_safetensors(file: Path):
    """``safe_open`` with a one-line ConversionError naming the file when it cannot be read (a
    truncated download says how many bytes are missing)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as error:
        truncated = _truncation(Path(file)) if Path(file).is_file() else None
        if truncated:
            raise ConversionError(f"{file} is truncated: {truncated} (copy or download it again)") from error
        raise ConversionError(f"{file} is not a readable safetensors file: {error}") from error


class SafetensorsSource:
    """Tensors of one or more .safetensors files, read lazily: only headers until a tensor is
    asked for, then just that tensor (or rows of it) through ``safe_open``."""

    def __init__(self, files_by_key: dict[str, Path], strip_prefix: str = ""):
        self._files_by_key = files_by_key  # stored key -> file
        self._prefix = strip_prefix
        self._handles: dict[Path, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in sorted(set(files_by_key.values())):
            with open_safetensors(file) as handle:
                for stored in handle.keys():
                    if files_by_key.get(stored) != file:
                        continue
                    tensor_slice = handle.get_slice(stored)
                    key = stored[len(strip_prefix):]
                    self.shapes[key] = tuple(tensor_slice.get_shape())
                    self.dtypes[key] = tensor_slice.get_dtype()
        missing_in_files = {k for k in files_by_key if k[len(strip_prefix):] not in self.shapes}
        if missing_in_files:
            from models.flux.state_dict_adapter import describe_keys

            raise ConversionError(
                f"the index names tensors its files do not hold: {describe_keys(missing_in_files)}"
            )

    def _handle(self, key: str):
        file = self._files_by_key[self._prefix + key]
        if file not in self._handles:
            self._handles[file] = open_safetensors(file)
        return self._handles[file]

    def get(self, key: str):
        return self._handle(key).get_tensor(self._prefix + key)

    def read_rows(self, key: str, rows: tuple[int, int] | None):
        if rows is None:
            return self.get(key)
        return self._handle(key).get_slice(self._prefix + key)[rows[0]:rows[1]]

    def release(self) -> None:
        """Closes the files (unmapping what was read) so resident memory stays one block's worth."""
        self._handles.clear()

    def nbytes(self, key: str) -> int:
        numel = 1
        for size in self.shapes[key]:
            numel *= size
        return numel * _SAFETENSORS_ITEMSIZE.get(self.dtypes[key], 4)

    def dominant_itemsize(self) -> int:
        counts: dict[str, int] = {}
        for dtype in self.dtypes.values():
            counts[dtype] = counts.get(dtype, 0) + 1
        return _SAFETENSORS_ITEMSIZE.get(max(counts, key=counts.get), 4) if counts else 4



def hf_folder_files(folder: Path, weights_name: str, flag: str) -> dict[str, Path]:
    """tensor key -> file of a Hugging Face style weights folder: ``<weights_name>.index.json``
    with its shards, or the single ``weights_name`` file."""
    index_path = folder / (weights_name + ".index.json")
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {key: folder / name for key, name in weight_map.items()}
        absent = sorted({f.name for f in files.values() if not f.is_file()})
        if absent:
            raise ConversionError(f"{index_path} names shard files that do not exist: {', '.join(absent)}")
        return files
    single = folder / weights_name
    if not single.is_file():
        present = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise ConversionError(
            f"{flag} {folder}: neither {index_path.name} nor {weights_name} (found: "
            f"{', '.join(present) or 'nothing'}); only safetensors weights are supported"
        )
    with open_safetensors(single) as handle:
        return {key: single for key in handle.keys()}


# --------------------------------------------------------------------------- writing shards


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most ``max_shard_size`` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def shard_file_names(count: int, weights_name: str) -> list[str]:
    """``weights_name`` for one shard; ``<stem>-00001-of-0000N.safetensors`` for more."""
    if count == 1:
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shards(
    output: Path,
    pairs: Iterable,
    planned: list[tuple[str, int]],
    shards: list[list[str]],
    weights_name: str,
    dtype=None,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Writes (key, tensor) pairs, arriving in ``planned`` order, as safetensors shards (and
    ``<weights_name>.index.json`` when there is more than one); a shard is written as soon as it
    is complete, so memory holds one shard."""
    from safetensors.torch import save_file

    names = shard_file_names(len(shards), weights_name)
    shard_of = {key: index for index, keys in enumerate(shards) for key in keys}
    pending: dict = {}
    for key, tensor in pairs:
        if dtype is not None:
            tensor = tensor.to(dtype)
        tensor = tensor.to("cpu")
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view (e.g. one head's QKV rows): safetensors wants its own storage
        pending[key] = tensor.contiguous()
        if on_tensor is not None:
            on_tensor(tensor.numel() * tensor.element_size())
        index = shard_of[key]
        if len(pending) == len(shards[index]):
            save_file(pending, str(output / names[index]), metadata={"format": "pt"})
            pending = {}
    if len(names) > 1:
        total = sum(nbytes for _, nbytes in planned)
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[shard_of[k]] for k, _ in planned}}
        (output / (weights_name + ".index.json")).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yields ``<output>.incomplete`` to write into; it becomes ``output`` (a rename) only when the
    body finished, so a failed or killed conversion never leaves ``output`` looking complete.

    Every rank of the job enters it; rank 0 creates, renames and (on an error in this process)
    removes the staging directory. ``output`` must be absent or an empty directory."""
    import torch.distributed as dist

    output = Path(output)
    staging = output.with_name(output.name + ".incomplete")
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if rank() == 0:
        if staging.exists():
            shutil.rmtree(staging)  # left by an earlier run that was killed
        staging.mkdir(parents=True)
    if distributed:
        dist.barrier()
    try:
        yield staging
        if distributed:
            dist.barrier()  # every rank's files are written
    except BaseException:
        if rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if rank() == 0:
        if output.exists():
            output.rmdir()  # empty, checked before the conversion started
        staging.rename(output)
    if distributed:
        dist.barrier()


# --------------------------------------------------------------------------- dist checkpoints in pieces
#
# megatron's save takes a sharded state dict whose tensors all exist: an import would hold its
# whole part of the model. Here the plan comes from a model built on the meta device (keys,
# shapes, dtypes, offsets: everything torch.distributed.checkpoint plans with) and the data from
# pieces (e.g. one layer each) materialised one at a time while torch's FileSystemWriter writes:
# its single-threaded CPU path asks the planner for each item's data (``resolve_data``) just before
# writing it, in plan order, which is sorted here by piece. The files are the ones megatron's own
# save writes (``__<rank>_0.distcp``, ``.metadata``, ``metadata.json``, ``common.pt``), so the
# trainer's loader reads them at any layout.


class CheckpointPiece:
    """Part of a rank's sharded state dict: ``keys`` (its tensors' checkpoint keys) and ``load()``,
    which returns that part's sharded state dict with data (what ``sharded_state_dict()`` of a
    module holding only that part gives)."""

    def __init__(self, keys: Iterable[str], load: Callable[[], dict]):
        self.keys = frozenset(keys)
        self.load = load


def sharded_keys(sharded_state_dict: dict) -> set[str]:
    """Checkpoint keys of the tensors (and tensor factories) in a sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {v.key for v in nested_values(sharded_state_dict) if isinstance(v, (ShardedTensor, ShardedTensorFactory))}


def _shard_data(sharded_state_dict: dict) -> dict:
    """(key, global offset) -> data of every ShardedTensor (factories built)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    return {(v.key, tuple(v.global_offset)): v.data for v in nested_values(sharded_state_dict)
            if isinstance(v, ShardedTensor)}


def _piece_wise_save_strategy(pieces: list[CheckpointPiece]):
    """A megatron torch_dist save strategy writing ``pieces``' data into the plan of the sharded
    state dict it is given (its tensors may be on the meta device)."""
    import dataclasses
    import gc

    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    from torch.distributed.checkpoint.planner import WriteItemType

    piece_of = {key: index for index, piece in enumerate(pieces) for key in piece.keys}

    class PieceWisePlanner(MCoreSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False,
                             can_run_decentralized_global_plan=False)
            self.loaded_piece, self.loaded, self.loads = None, {}, 0
            self.written = None  # the tensor handed to the writer last

        def _piece(self, item) -> int:
            if item.type == WriteItemType.BYTE_IO:
                return -1  # objects (megatron's common state, extra states) first: no data to load
            if item.index.fqn not in piece_of:
                raise ConversionError(f"checkpoint tensor {item.index.fqn} belongs to no piece")
            return piece_of[item.index.fqn]

        def create_local_plan(self):
            plan = super().create_local_plan()
            order = sorted(range(len(plan.items)), key=lambda i: (self._piece(plan.items[i]), i))
            self.plan = dataclasses.replace(plan, items=[plan.items[i] for i in order])
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            if self.written is not None:
                # torch's writer keeps every tensor it wrote until its file is closed (its
                # safetensors format writes them then; ours was written as it came): the last
                # one's memory goes now, as the serial loader only asks for the next item after
                # writing the previous one.
                self.written.untyped_storage().resize_(0)
                self.written = None
            piece = self._piece(write_item)
            if piece != self.loaded_piece:
                self.loaded_piece, self.loaded = None, {}  # the previous piece goes first
                gc.collect()  # modules keep reference cycles: without this a piece outlives its turn
                self.loaded = _shard_data(pieces[piece].load())
                self.loaded_piece = piece
                self.loads += 1
            data = self.loaded[(write_item.index.fqn, tuple(write_item.index.offset))]
            # A copy of its own (a SwiGLU half shares its parameter with the other half).
            self.written = data.reshape(write_item.tensor_data.chunk.sizes).clone(memory_format=torch.contiguous_format)
            return self.written

    class PieceWiseSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            planner = PieceWisePlanner()
            # One thread and no copy-ahead (the serial loader, also where CUDA is available):
            # each item is resolved (materialised) just before it is written, in plan order.
            # torch.save format: written item by item (resolve_data relies on it).
            writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1,
                                          per_thread_copy_ahead=0,
                                          serialization_format=SerializationFormat.TORCH_SAVE)
            dcp.save(mcore_to_pyt_state_dict(sharded_state_dict, False), storage_writer=writer, planner=planner)
            self.piece_loads = planner.loads

    return PieceWiseSaveStrategy()


def save_dist_checkpoint_in_pieces(meta_sharded_state_dict: dict, directory, pieces: list[CheckpointPiece]) -> int:
    """megatron ``dist_checkpointing.save`` of ``meta_sharded_state_dict`` (this rank's part; its
    tensors only give shapes, dtypes and offsets) with the data taken from ``pieces``, one piece
    in memory at a time. Every rank of the job calls it. Returns how many times a piece was
    loaded (the number of pieces holding data when the plan's order is kept)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    keys = sharded_keys(meta_sharded_state_dict)
    covered = set().union(*(piece.keys for piece in pieces)) if pieces else set()
    if keys - covered:
        raise ConversionError(f"{len(keys - covered)} checkpoint tensors belong to no piece, e.g. {sorted(keys - covered)[0]}")
    if sum(len(piece.keys) for piece in pieces) != len(covered):
        raise ConversionError("checkpoint pieces overlap: each tensor key must belong to exactly one piece")

    strategy = _piece_wise_save_strategy(pieces)
    try:
        dist_checkpointing.save(meta_sharded_state_dict, str(directory), sharded_strategy=strategy)
    except CheckpointException as error:
        # torch.distributed.checkpoint wraps what a rank raised while writing (here: reading a
        # piece, e.g. a shape that does not fit) in a BaseException: the first one, as raised,
        # so a command's input error stays its one line.
        failures = [failure for failure in error.failures.values() if isinstance(failure, tuple) and failure]
        if failures and isinstance(failures[0][0], Exception):
            raise failures[0][0] from None
        raise
    return strategy.piece_loads


# --------------------------------------------------------------------------- processes, errors


def start_parallel(**sizes: int):
    """torch.distributed + megatron groups: torchrun's world with ``sizes``, or a world of one
    (gloo on CPU) when not started under torchrun."""
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.parallel.spawn import free_port

    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return initialize_parallel()
    return initialize_parallel(**sizes)


def run_and_tear_down(command: Callable[[], dict]) -> dict:
    """Runs ``command``; tears torch.distributed down afterwards only if this call started it (a
    caller that set up its own ranks keeps them)."""
    import torch.distributed as dist

    started_here = not dist.is_initialized()
    try:
        return command()
    finally:
        if started_here and dist.is_initialized():
            from mfmegatron.parallel import destroy_parallel

            destroy_parallel()


# Errors about the inputs (paths, keys, shapes, layout): one line, no traceback. (module, class)
# pairs are looked up only if the module was imported: otherwise the error cannot be of its kind.
USER_ERROR_KINDS = (
    ("models.flux.state_dict_adapter", "CheckpointMismatchError"),
    ("mfmegatron.parallel.state", "ParallelConfigError"),
)


def is_user_error(error: BaseException, extra_kinds: Iterable[tuple[str, str]] = ()) -> bool:
    kinds = [ConversionError, FileNotFoundError, FileExistsError]
    for module, name in (*USER_ERROR_KINDS, *extra_kinds):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(error, tuple(kinds))


def cli_main(prog: str, run: Callable[[list[str] | None], dict], argv: list[str] | None = None,
             extra_error_kinds: Iterable[tuple[str, str]] = ()) -> int:
    """A conversion CLI's ``main``: input errors are one line (``prog: error: ...``), exit code 2."""
    from mfmegatron.warnings_filter import quiet_expected_warnings

    # As the trainer: megatron's and torch's import-time warnings (no TE/apex/CUDA here) would
    # bury the one line that matters.
    quiet_expected_warnings()
    # Under torchrun every rank meets the same error: rank 0 says it, once (report_user_error
    # reads the rank from the environment: run() has torn the process group down by then).
    try:
        run(argv)
    except Exception as error:  # noqa: BLE001
        if not is_user_error(error, extra_kinds=extra_error_kinds):
            raise
        return report_user_error(prog, error)
    return 0
