"""Convert FLUX.1 transformer checkpoints to and from mfmegatron's megatron dist checkpoints.

  import   a diffusers FluxTransformer2DModel folder (or a pipeline folder with transformer/), or
           an original single-file checkpoint (flux1-dev.safetensors) -> a dist checkpoint
  export   a dist checkpoint -> a diffusers folder for FluxTransformer2DModel.from_pretrained

MeanFlow students (checkpoints with the interval embedding ``interval_in.*``) are detected from
their keys: export writes the teacher-architecture folder plus interval_embedder.safetensors and
interval_embedder.json (see models/flux/interval_embedder.py), and import reads such a folder back
into a student checkpoint.

A dist checkpoint is a megatron-core dist_checkpointing directory (torch_dist format) plus
mfmegatron_flux.json (the architecture as diffusers' config.json, and the dtype). Its tensor keys
do not depend on the layout that wrote it: it loads at any tensor / pipeline / data parallel size.

Conversion streams: safetensors are read one tensor at a time (safe_open); import plans megatron's
save from the stage built on the meta device and fills it one block at a time while the writer
goes through the plan (mfmegatron/conversion.py: save_dist_checkpoint_in_pieces), and export reads
the checkpoint a block at a time and writes one safetensors shard at a time. Runs on CPU (gloo, one process) or,
for import, under torchrun with the ranks writing their own shards.

examples:
  mfmegatron-convert-flux import --diffusers FLUX.1-dev --output ckpt/flux1-dev
  mfmegatron-convert-flux import --original flux1-dev.safetensors --output ckpt/flux1-dev
  mfmegatron-convert-flux import --diffusers FLUX.1-dev --output ckpt/check --dry-run --tensor-parallel-size 8
  torchrun --nproc-per-node 4 -m tools.convert_flux import --diffusers FLUX.1-dev --output ckpt/flux1-dev --tensor-parallel-size 2 --pipeline-parallel-size 2
  mfmegatron-convert-flux export --checkpoint ckpt/flux1-dev --output flux1-dev-diffusers
  mfmegatron-convert-flux export --checkpoint ckpt/student --output student-diffusers
  mfmegatron-convert-flux export --checkpoint outputs/run/checkpoints/step_00010000 --output student --weights ema
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

from mfmegatron.conversion import (  # shared with tools/convert_hunyuan_image3.py
    DTYPES,
    CheckpointPiece,
    ConversionError,
    Progress,
    SafetensorsSource,
    check_export_arguments,
    cli_main,
    format_bytes,
    hf_folder_files,
    open_safetensors,
    parse_size,
    run_and_tear_down,
    sharded_keys,
    staged_output,
    start_parallel,
)
from mfmegatron.conversion import log as _log
from mfmegatron.conversion import require_empty_output as _require_empty_output
from mfmegatron.conversion import torch_dtype as _torch_dtype

PROG = "mfmegatron-convert-flux"


# Also in models/flux/export.py, which writes the folders (this module imports torch lazily).
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"



def diffusers_folder_files(path: Path) -> tuple[dict, dict[str, Path], Path]:
    """(config.json dict, tensor key -> file, the transformer folder) of a diffusers folder."""
    if not path.exists():
        raise ConversionError(f"--diffusers {path}: no such file or directory")
    if not path.is_dir():
        raise ConversionError(f"--diffusers {path}: not a directory (for a single .safetensors file use --original)")
    folder = path
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"  # a pipeline folder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(
            f"--diffusers {path}: no config.json (nor transformer/config.json); expected a "
            "FluxTransformer2DModel folder as written by save_pretrained, or a pipeline folder"
        )
    config = json.loads(config_path.read_text())
    return config, hf_folder_files(folder, DIFFUSERS_WEIGHTS, "--diffusers"), folder


def interval_embedder_source(folder: Path) -> SafetensorsSource | None:
    """A MeanFlow student's interval embedder next to the transformer in ``folder`` (lazily read),
    or None for a plain FLUX transformer."""
    from models.flux import interval_embedder

    if not interval_embedder.has_interval_embedder(folder):
        return None
    try:
        record = interval_embedder.read_config(folder)
    except interval_embedder.IntervalEmbedderFormatError as error:
        raise ConversionError(str(error)) from error
    weights = folder / record.get("weights", interval_embedder.WEIGHTS_NAME)
    if not weights.is_file():
        raise ConversionError(f"{folder}: {interval_embedder.CONFIG_NAME} names {weights.name}, which does not exist")
    with open_safetensors(weights) as handle:
        return SafetensorsSource({key: weights for key in handle.keys()})


def original_file_source(path: Path) -> tuple[SafetensorsSource, int]:
    """The BFL single file as a source with the optional ``model.diffusion_model.`` prefix
    removed; returns it and the number of non-transformer tensors ignored."""
    if not path.exists():
        raise ConversionError(f"--original {path}: no such file or directory")
    if not path.is_file():
        raise ConversionError(f"--original {path}: not a file (for a diffusers folder use --diffusers)")
    from models.flux.state_dict_adapter import BFL_PREFIX

    with open_safetensors(path) as handle:
        keys = list(handle.keys())
    prefixed = [k for k in keys if k.startswith(BFL_PREFIX)]
    if prefixed:
        # A full checkpoint may carry the VAE / text encoders under other prefixes: skip those.
        return SafetensorsSource({k: path for k in prefixed}, BFL_PREFIX), len(keys) - len(prefixed)
    return SafetensorsSource({k: path for k in keys}), 0


def resolve_architecture(config_arg: str | None, source: SafetensorsSource) -> dict:
    """The diffusers config dict for a BFL file: a preset name, a config.json path, or inferred."""
    from models.flux.config import FLUX_CONFIGS
    from models.flux.state_dict_adapter import diffusers_config_from_flux, infer_diffusers_config_from_bfl

    if config_arg is None:
        return infer_diffusers_config_from_bfl(source.shapes)
    if config_arg in FLUX_CONFIGS:
        return diffusers_config_from_flux(FLUX_CONFIGS[config_arg]())
    path = Path(config_arg)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"--config {config_arg}: neither a preset ({', '.join(FLUX_CONFIGS)}) nor a config.json file"
        )
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- parallel set-up


def _start_parallel(tp: int, pp: int):
    return start_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)

def _flux_config(diffusers_config: dict, dtype, tp: int = 1, pp: int = 1, student: bool = False):
    import torch

    from models.flux.state_dict_adapter import flux_config_from_diffusers

    return flux_config_from_diffusers(
        diffusers_config,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype if pp > 1 else None,
        mean_flow_student=student,
        # Parameters are allocated empty on the CPU and filled from the file.
        use_cpu_initialization=True,
        perform_initialization=False,
    )


def validate_layout(diffusers_config: dict, dtype, tp: int, pp: int, student: bool = False):
    """The config split tp x pp; ConversionError if the model cannot be (megatron's own checks)."""
    try:
        config = _flux_config(diffusers_config, dtype, tp, pp, student)
    except (AssertionError, ValueError) as error:
        raise ConversionError(f"the model cannot be split tp={tp} pp={pp}: {error}") from error
    if pp > config.num_layers:
        raise ConversionError(f"pp={pp} stages for {config.num_layers} blocks: every stage needs a block")
    return config


# --------------------------------------------------------------------------- import


def run_import(args) -> dict:
    """The ``import`` command; returns a summary (also used by the tests)."""
    import torch

    started = time.perf_counter()
    output = Path(args.output)
    interval = None  # a MeanFlow student's interval embedder (exported next to the transformer)
    if args.diffusers is not None:
        if args.config is not None:
            raise ConversionError("--config is for --original; a diffusers folder brings its config.json")
        diffusers_config, files, folder = diffusers_folder_files(Path(args.diffusers))
        source, ignored = SafetensorsSource(files), 0
        source_info = {"format": "diffusers", "name": Path(args.diffusers).name}
        interval = interval_embedder_source(folder)
    else:
        source, ignored = original_file_source(Path(args.original))
        diffusers_config = resolve_architecture(args.config, source)
        source_info = {"format": "bfl", "name": Path(args.original).name}
    if not args.dry_run:
        _require_empty_output(output)
    dtype = _torch_dtype(args.dtype)
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size

    from models.flux.parallelize import (
        build_flux_model,
        full_parameter_shapes,
        load_streamed_weights,
        meta_full_model,
        piece_model,
        save_dist_checkpoint,
        stage_pieces,
    )
    from models.flux.state_dict_adapter import (
        bfl_shapes,
        check_key_sets,
        check_shapes,
        diffusers_getter_from_bfl,
        diffusers_shapes,
        interval_from_megatron,
        interval_to_megatron,
        to_megatron,
    )

    # One process builds the whole model and only checks that tp x pp would fit; under torchrun
    # the ranks build that layout and each writes its own shards.
    student = interval is not None
    config = validate_layout(diffusers_config, dtype, tp, pp, student)
    info = _start_parallel(tp, pp)
    single_process = info.world_size == 1
    if single_process:
        config = _flux_config(diffusers_config, dtype, student=student)

    # Check every source key and shape against the config before reading any data.
    ours = full_parameter_shapes(meta_full_model(config))
    expected = diffusers_shapes(ours, config)
    what = f"{source_info['format']} checkpoint {args.diffusers or args.original}"
    if source_info["format"] == "bfl":
        expected = bfl_shapes(config, expected)
        hint = " (pass --config to name the architecture)" if args.config is None else ""
    else:
        hint = ""
    check_key_sets(source.shapes, expected, what, hint)
    check_shapes(source.shapes, expected, what, hint)
    if student:
        interval_what = f"interval embedder of {args.diffusers}"
        interval_expected = {key: ours[our_key] for key, our_key in
                             interval_from_megatron(lambda k: k)}  # file key -> our shape
        check_key_sets(interval.shapes, interval_expected, interval_what)
        check_shapes(interval.shapes, interval_expected, interval_what)

    with torch.device("meta"):  # this rank's stage: the checkpoint's plan (keys, shapes, dtypes)
        model = build_flux_model(config)
    stage_keys = set(full_parameter_shapes(model))
    total = sum(_numel(ours[k]) for k in stage_keys) * source.dominant_itemsize()
    summary = {
        "tensors": len(source.shapes),
        "source_bytes": sum(source.nbytes(k) for k in source.shapes),
        "parameters": sum(_numel(s) for s in ours.values()),
        "layout": info.describe(),
        "ignored_tensors": ignored,
        "mean_flow_student": student,
    }
    _log(
        f"{PROG} import: {what}: {summary['tensors']} tensors, {format_bytes(summary['source_bytes'])}, "
        f"{summary['parameters']:,} parameters; process layout {info.describe()}"
        + (f"; ignored {ignored} tensors outside the transformer" if ignored else "")
        + ("; MeanFlow student (with interval_embedder.safetensors)" if student else ""),
        args.quiet,
    )
    if args.dry_run:
        _log(f"dry run: keys and shapes match; nothing written (would write {output})", args.quiet)
        return summary

    if source_info["format"] == "bfl":
        get = diffusers_getter_from_bfl(source.read_rows, config)
    else:
        get = source.get
    progress = Progress(total, "import", args.quiet)

    def load_piece(piece) -> dict:
        """One block of this rank's stage (the first piece of the first stage with the embedders,
        the last of the last with the final layer), converted tensor by tensor from the source;
        its files are closed afterwards so their mapped pages go too."""
        block_range, first, last = piece
        part = piece_model(config, piece)
        keys = set(full_parameter_shapes(part))
        pairs = to_megatron(get, config, block_indices=range(*block_range), top_level=first or last)
        if student and first:
            pairs = itertools.chain(pairs, interval_to_megatron(interval.get))
        try:
            load_streamed_weights(
                part,
                ((key, tensor) for key, tensor in pairs if key in keys),  # the other end's top-level
                on_tensor=lambda key, tensor: progress.update(tensor.numel() * tensor.element_size()),
            )
        finally:
            source.release()
        return part.sharded_state_dict()

    pieces = [CheckpointPiece(sharded_keys(piece_model(config, piece, device="meta").sharded_state_dict()),
                              lambda piece=piece: load_piece(piece))
              for piece in stage_pieces(config)]
    extra_info = {"mean_flow_student": True} if student else {}
    try:
        # Tensors are read while the checkpoint is written: a bad one met then leaves nothing.
        with staged_output(output) as staging:
            piece_loads = save_dist_checkpoint(model, staging, diffusers_config, pieces=pieces, source=source_info,
                                               **extra_info)
    finally:
        progress.close()
        source.release()
    summary.update(seconds=time.perf_counter() - started, pieces=len(pieces), piece_loads=piece_loads)
    _log(
        f"wrote {output} ({args.dtype}) in {summary['seconds']:.1f} s, one block in memory at a time. "
        f"It is layout-independent: load it at any "
        f"TP/PP size" + (f" (checked tp={tp} pp={pp} fits this model)" if single_process and tp * pp > 1 else ""),
        args.quiet,
    )
    return summary


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- export


def _block_group(key: str) -> str:
    """'double_blocks.3' / 'single_blocks.7' for a block's tensor, '' for the top-level ones."""
    match = re.match(r"(double_blocks|single_blocks)\.\d+", key)
    return match.group(0) if match else ""


class CheckpointReader:
    """Full (unsharded) tensors of a dist checkpoint, loaded one block at a time.

    ``get(key)`` loads the whole block holding ``key`` on first use and drops the previous block,
    so memory holds one block (plus the top-level weights once), never the model.
    """

    def __init__(self, directory: Path, metadata: dict, prefix: str = ""):
        self.directory = directory
        self.metadata = metadata  # by our key, without ``prefix``
        self.prefix = prefix  # what the checkpoint's keys start with (a training checkpoint's "ema.")
        self.groups: dict[str, list[str]] = {}
        for key in metadata:
            self.groups.setdefault(_block_group(key), []).append(key)
        self._group: str | None = None
        self._tensors: dict = {}

    def get(self, key: str):
        group = _block_group(key)
        if group != self._group:
            self._tensors = {}
            self._tensors = self._load(self.groups[group])
            self._group = group
        return self._tensors[key]

    def _load(self, keys: list[str]) -> dict:
        import torch
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        sharded = {
            key: ShardedTensor.from_rank_offsets(
                self.prefix + key, torch.empty(self.metadata[key].global_shape, dtype=self.metadata[key].dtype),
                replica_id=0,
            )
            for key in keys
        }
        loaded = dist_checkpointing.load(sharded, str(self.directory), validate_access_integrity=False)
        return {key: loaded[key] for key in keys}


def run_export(args) -> dict:
    """The ``export`` command; returns a summary (also used by the tests)."""
    started = time.perf_counter()
    checkpoint, output = Path(args.checkpoint), Path(args.output)
    check_export_arguments(checkpoint, output, args.dry_run)

    import torch
    from megatron.core import dist_checkpointing

    from models.flux.export import plan_shards, shard_file_names, write_config, write_interval_embedder, write_shards
    from models.flux.parallelize import checkpoint_tensor_shapes, read_checkpoint_info
    from models.flux.state_dict_adapter import check_key_sets, check_shapes, from_megatron, is_student_keys

    record = read_checkpoint_info(checkpoint)
    info = _start_parallel(1, 1)
    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    # A training checkpoint keeps the FLUX weights under prefixes (the EMA's, then the student's).
    prefixes = record.get("weight_prefixes", [""])
    prefix = prefixes[0] if args.weights is None else args.weights + "."
    if prefix not in prefixes:
        held = ", ".join(p.rstrip(".") for p in prefixes if p) or "one set of weights, not a training checkpoint's"
        raise ConversionError(f"--weights {args.weights}: {checkpoint} holds {held}")
    metadata = {key[len(prefix):]: value for key, value in metadata.items() if key.startswith(prefix)}
    found = {key: tuple(value.global_shape) for key, value in metadata.items()}
    # A MeanFlow student is FLUX plus the interval embedding: recognised by its keys.
    student = is_student_keys(found)
    config = _flux_config(record["diffusers_config"], _torch_dtype(record["dtype"]), student=student)
    expected = checkpoint_tensor_shapes(config)
    hint = f" (architecture from {checkpoint}/mfmegatron_flux.json)"
    check_key_sets(found, expected, f"checkpoint {checkpoint}", hint)
    check_shapes(found, expected, f"checkpoint {checkpoint}", hint)

    out_dtype = _torch_dtype(args.dtype) if args.dtype else None

    def meta(key):
        return torch.empty(found[key], dtype=out_dtype or metadata[key].dtype, device="meta")

    planned = [(key, t.numel() * t.element_size()) for key, t in from_megatron(meta, config)]
    shards = plan_shards(planned, args.max_shard_size)
    names = shard_file_names(len(shards))
    total = sum(nbytes for _, nbytes in planned)
    summary = {"tensors": len(planned), "bytes": total, "shards": names, "layout": info.describe(),
               "mean_flow_student": student}
    _log(
        f"{PROG} export: {checkpoint} -> {output}: {len(planned)} tensors, {format_bytes(total)} in "
        f"{len(names)} shard(s) of at most {format_bytes(args.max_shard_size)}"
        + ("; MeanFlow student: its interval embedding goes to interval_embedder.safetensors" if student else ""),
        args.quiet,
    )
    if args.dry_run:
        _log("dry run: checkpoint matches its config; nothing written", args.quiet)
        return summary

    output.mkdir(parents=True, exist_ok=True)
    reader = CheckpointReader(checkpoint, metadata, prefix)
    if student:
        # First: the interval tensors are top-level, loaded together with the other top-level ones.
        write_interval_embedder(output, reader.get, out_dtype, config.timestep_embedding_dim,
                                config.time_embedding_scale)
    progress = Progress(total, "export", args.quiet)
    try:
        write_shards(output, from_megatron(reader.get, config), planned, shards, out_dtype, progress.update)
    finally:
        progress.close()
    write_config(output, record["diffusers_config"])
    summary["seconds"] = time.perf_counter() - started
    _log(f"wrote {output} in {summary['seconds']:.1f} s", args.quiet)
    return summary


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{import,export}")

    imp = sub.add_parser(
        "import",
        help="diffusers folder or original single file -> dist checkpoint",
        description=(
            "Convert a FLUX.1 transformer to a megatron dist checkpoint. The checkpoint is "
            "layout-independent: it loads at any tensor/pipeline/data parallel size, whatever "
            "layout wrote it."
        ),
    )
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers", metavar="DIR",
                        help="a FluxTransformer2DModel folder (config.json + diffusion_pytorch_model*.safetensors, "
                             "sharded with an index or one file) or a pipeline folder with transformer/; with "
                             "interval_embedder.json beside the weights it is a MeanFlow student export and "
                             "becomes a student checkpoint")
    source.add_argument("--original", metavar="FILE",
                        help="an original BFL single file (flux1-dev.safetensors); keys may carry the "
                             "'model.diffusion_model.' prefix")
    imp.add_argument("--config", metavar="NAME|FILE",
                     help="with --original: the architecture, a preset (flux1-dev, flux1-schnell, tiny) or a "
                          "diffusers config.json; default: inferred from the tensor shapes (FLUX.1 sizes)")
    imp.add_argument("--output", required=True, metavar="DIR", help="the dist checkpoint directory to create (must be empty)")
    imp.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="parameter dtype stored (default: bf16)")
    imp.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                     help="under torchrun: the tensor-parallel size the ranks build and write from. In one "
                          "process: only checked (the model must split N ways); the checkpoint is the same")
    imp.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="N",
                     help="as --tensor-parallel-size, for pipeline stages")
    imp.add_argument("--dry-run", action="store_true",
                     help="check keys, shapes and layout on the meta device; read no tensor data, write nothing")
    imp.add_argument("--quiet", action="store_true", help="no progress output")

    exp = sub.add_parser(
        "export",
        help="dist checkpoint -> diffusers folder",
        description=(
            "Convert a dist checkpoint (saved at any layout) to a diffusers FluxTransformer2DModel folder: "
            "config.json and safetensors shards (with diffusion_pytorch_model.safetensors.index.json when "
            "there is more than one). A MeanFlow student (recognised by its interval_in.* tensors) also "
            "gets interval_embedder.safetensors and interval_embedder.json, which MeanFlowFluxPipeline "
            "loads (models/flux/pipeline.py). Runs in one process."
        ),
    )
    exp.add_argument("--checkpoint", required=True, metavar="DIR", help="a dist checkpoint written by import or training")
    exp.add_argument("--output", required=True, metavar="DIR", help="the diffusers folder to create (must be empty)")
    exp.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                     help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB). Peak memory is "
                          "about one shard plus one block")
    exp.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="dtype of the written tensors (default: as stored in the checkpoint)")
    exp.add_argument("--weights", choices=["ema", "student"], default=None,
                     help="of a training checkpoint (output_dir/checkpoints/step_N): the student's EMA (the "
                          "default when it has one) or its trained weights")
    exp.add_argument("--dry-run", action="store_true", help="check the checkpoint and print the shard plan; write nothing")
    exp.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv`` and runs the command; raises on errors (``main`` prints them).

    torch.distributed is torn down at the end only if this call started it (a caller that set up
    its own ranks keeps them; megatron's groups are then those of the command's layout).
    """
    args = build_parser().parse_args(argv)
    return run_and_tear_down(lambda: run_import(args) if args.command == "import" else run_export(args))


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
