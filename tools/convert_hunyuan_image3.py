"""Convert HunyuanImage 3.0 checkpoints to and from mfmegatron's megatron dist checkpoints.

  import   a Hugging Face folder (config.json, model.safetensors.index.json and its shards, the
           released key names) -> a dist checkpoint
  export   a dist checkpoint (written at any TP / EP / PP) -> a Hugging Face folder, bit-exact
           after import

What is converted: the language-model trunk (``model.*``, ``lm_head``) and, when our model has it,
the image head (``patch_embed``, ``final_layer``, ``timestep_emb``, ``time_embed``,
``time_embed_2``, and a few-step student's ``guidance_emb`` / ``timestep_r_emb``, as config.json's
``cfg_distilled`` / ``use_meanflow`` say); see models/hunyuan_image3/state_dict_adapter.py. Not converted: the VAE
(``vae.*``), the vision tower (``vision_model.*``) and its aligner (``vision_aligner.*``), which
import skips by name (with a count). ``export --copy-unconverted-from <released folder>`` copies
those tensors (and the folder's other files: tokenizer, code, generation config) into the output,
so it loads as a whole model again.

A dist checkpoint is a megatron-core dist_checkpointing directory plus mfmegatron_hunyuan_image3.json
(the released config.json's fields and the dtype). Its keys are global (every expert on an expert
axis), so it loads at any TP / EP / PP size and exports the same whatever layout wrote it.

Streaming: import plans megatron's save from this rank's part of the model built on the meta
device and fills it one layer at a time while the writer goes through the plan
(mfmegatron/conversion.py: save_dist_checkpoint_in_pieces): each layer's tensors are read one at
a time (safe_open) from the rank's experts and stage only; memory is one layer of this rank's part
(the first / last also holding what precedes / follows the layers) plus one tensor, in one process
too. Export loads one layer at a time and writes one safetensors shard at a time: memory is about
one shard plus one layer. Both write into <output>.incomplete and rename it to <output> only when
everything is written. Under torchrun with EP (and TP / PP) each rank reads and writes its part.

examples:
  mfmegatron-convert-hunyuan-image3 import --hf HunyuanImage-3 --output ckpt/hunyuan-image3
  mfmegatron-convert-hunyuan-image3 import --hf HunyuanImage-3 --output ckpt/check --dry-run --expert-parallel-size 8 --tensor-parallel-size 2
  torchrun --nproc-per-node 8 -m tools.convert_hunyuan_image3 import --hf HunyuanImage-3 --output ckpt/hunyuan-image3 --expert-parallel-size 8
  mfmegatron-convert-hunyuan-image3 export --checkpoint ckpt/hunyuan-image3 --output hunyuan-image3-hf --copy-unconverted-from HunyuanImage-3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from mfmegatron.conversion import (
    DTYPES,
    CheckpointPiece,
    ConversionError,
    Progress,
    SafetensorsSource,
    check_export_arguments,
    cli_main,
    format_bytes,
    hf_folder_files,
    log,
    parse_size,
    plan_shards,
    require_empty_output,
    run_and_tear_down,
    shard_file_names,
    sharded_keys,
    staged_output,
    start_parallel,
    torch_dtype,
    write_shards,
)

PROG = "mfmegatron-convert-hunyuan-image3"
HF_WEIGHTS = "model.safetensors"


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def hf_folder(path: Path) -> tuple[dict, dict[str, Path]]:
    """(config.json, tensor key -> file) of a released-layout folder."""
    if not path.is_dir():
        raise ConversionError(f"--hf {path}: no such directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"--hf {path}: no config.json; expected a HunyuanImage 3.0 folder as released")
    return json.loads(config_path.read_text()), hf_folder_files(path, HF_WEIGHTS, "--hf")


def model_config(hf_config: dict, dtype, **overrides):
    """Our config for ``hf_config``, parameters allocated empty (they are filled from a file)."""
    import torch

    from models.hunyuan_image3.state_dict_adapter import config_from_hf

    settings = dict(
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False,
    )
    settings.update(overrides)
    if settings.get("pipeline_model_parallel_size", 1) > 1:
        settings.setdefault("pipeline_dtype", dtype)
    return config_from_hf(hf_config, **settings)


def _parse_stage_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConversionError(f"--pipeline-layers {text!r}: expected layer counts per stage, e.g. 9,8,8,7") from None


def _conversion_names(model_names, config) -> tuple[bool, dict[str, tuple[str, bool]]]:
    """(image head built, our key -> (released key, swap GLU halves)); every one of the model's
    parameters (full names; a rank's part of the model is enough) must be mapped."""
    from models.hunyuan_image3.state_dict_adapter import describe_keys, key_pairs

    image_head = config.image_path
    released_of = {ours: (hf, swap) for hf, ours, swap in key_pairs(config, image_head)}
    unknown = set(model_names) - set(released_of)
    if unknown:
        raise ConversionError(f"the model has parameters the conversion does not map: {describe_keys(unknown)}")
    return image_head, released_of


# --------------------------------------------------------------------------- import


def run_import(args) -> dict:
    """The ``import`` command; returns a summary (also used by the tests)."""
    started = time.perf_counter()
    output = Path(args.output)
    hf_config, files = hf_folder(Path(args.hf))
    source = SafetensorsSource(files)
    if not args.dry_run:
        require_empty_output(output)
    dtype = torch_dtype(args.dtype)
    tp, ep, pp = args.tensor_parallel_size, args.expert_parallel_size, args.pipeline_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    pipeline_layers = _parse_stage_list(args.pipeline_layers)

    import torch

    from models.hunyuan_image3.parallelize import (
        build_hunyuan_model,
        check_layout,
        full_shape,
        load_weights,
        local_weights,
        piece_model,
        save_dist_checkpoint,
        stage_pieces,
    )
    from models.hunyuan_image3.state_dict_adapter import (
        check_key_sets,
        check_shapes,
        is_known_unconverted_key,
        released_shapes,
        swap_glu_halves,
    )

    # The layout is checked on the architecture alone, before any process group exists: every
    # rank computes the same one-line answer.
    check_layout(model_config(hf_config, dtype), tp=tp, ep=ep, pp=pp, etp=etp, sequence_parallel=tp > 1,
                 pipeline_layers=pipeline_layers)
    info = start_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep,
                          expert_tensor_parallel_size=etp)
    single_process = info.world_size == 1
    if single_process:  # one process holds the whole model; the layout was only checked
        config = model_config(hf_config, dtype)
    else:
        config = model_config(
            hf_config, dtype, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp, pipeline_model_parallel_size=pp, sequence_parallel=tp > 1,
            pipeline_layers=pipeline_layers,
        )

    with torch.device("meta"):  # this rank's part, for its parameter names
        image_head, released_of = _conversion_names([key for key, _ in local_weights(build_hunyuan_model(config))],
                                                    config)

    # Every source key and shape against the architecture before reading any data.
    expected = released_shapes(config, image_head)
    skipped = sorted(k for k in source.shapes if is_known_unconverted_key(k, image_head))
    found = {k: v for k, v in source.shapes.items() if k not in set(skipped)}
    what = f"HunyuanImage 3.0 checkpoint {args.hf}"
    check_key_sets(found, expected, what)
    check_shapes(found, expected, what)

    skipped_by_module: dict[str, int] = {}
    for key in skipped:
        module = key.split(".")[0]
        skipped_by_module[module] = skipped_by_module.get(module, 0) + 1
    summary = {
        "tensors": len(found),
        "skipped": skipped_by_module,
        "source_bytes": sum(source.nbytes(k) for k in found),
        "parameters": sum(_numel(s) for s in expected.values()),
        "layout": info.describe(),
        "image_head": image_head,
    }
    log(
        f"{PROG} import: {what}: {summary['tensors']} tensors, {format_bytes(summary['source_bytes'])}, "
        f"{summary['parameters']:,} parameters{'' if image_head else ' (trunk only)'}; process layout "
        f"{info.describe()}"
        + (f"; skipped {len(skipped)} tensors not converted ("
           + ", ".join(f"{module}.*: {n}" for module, n in skipped_by_module.items()) + ")" if skipped else ""),
        args.quiet,
    )
    if args.dry_run:
        log(f"dry run: keys, shapes and layout fit; nothing written (would write {output})", args.quiet)
        return summary

    with torch.device("meta"):  # this rank's part: the checkpoint's plan (keys, shapes, dtypes)
        model = build_hunyuan_model(config)
    # This rank's parameters by full name (its experts, its stage's layers): only these are read.
    mine = [(key, param) for (key, _), (_, param) in zip(local_weights(model), model.named_parameters())]
    total = sum(_numel(full_shape(key, param)) * source.dominant_itemsize() for key, param in mine)
    progress = Progress(total, "import", args.quiet)

    def get_full(key: str):
        released, swap = released_of[key]
        tensor = source.get(released)
        source.release()  # unmap the pages just read (they count as resident until unmapped)
        return swap_glu_halves(tensor) if swap else tensor

    def load_piece(piece) -> dict:
        """One layer of this rank's part (with what precedes / follows the layers on the first /
        last piece), filled from the safetensors: memory holds one layer (and one tensor being
        read) while megatron's writer takes it."""
        piece_part = piece_model(config, piece)
        load_weights(piece_part, get_full, on_tensor=lambda key, t: progress.update(t.numel() * t.element_size()))
        return piece_part.sharded_state_dict()

    pieces = []
    for piece in stage_pieces(config):
        keys = sharded_keys(piece_model(config, piece, device="meta").sharded_state_dict())
        pieces.append(CheckpointPiece(keys, lambda piece=piece: load_piece(piece)))

    try:
        with staged_output(output) as staging:
            piece_loads = save_dist_checkpoint(model, staging, hf_config, pieces=pieces,
                                               source={"format": "hf", "name": Path(args.hf).name},
                                               skipped=skipped_by_module)
    finally:
        progress.close()
        source.release()
    summary.update(seconds=time.perf_counter() - started, pieces=len(pieces), piece_loads=piece_loads)
    log(
        f"wrote {output} ({args.dtype}) in {summary['seconds']:.1f} s, one layer in memory at a time. "
        f"It is layout-independent: load it at any TP/EP/PP size"
        + (f" (checked tp={tp} ep={ep} pp={pp} fits this model)" if single_process and tp * ep * pp > 1 else ""),
        args.quiet,
    )
    return summary


# --------------------------------------------------------------------------- export


ROUTER_SUFFIX = "mlp.gate.wg.weight"  # released float32 and used in float32: never cast


def _checkpoint_tensors(checkpoint: Path, config, released_of: dict, dtype=None, prefix: str = ""):
    """(released key, tensor) of the whole checkpoint, in model order, loading one layer at a
    time (the first and last also bring what precedes and follows the layers); cast to
    ``dtype`` if given, except the router. ``prefix``: the weights' key prefix in a training
    checkpoint (``ema.`` or ``student.``; parameters only)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    from models.hunyuan_image3.parallelize import export_pieces, local_weights, one_layer_model
    from models.hunyuan_image3.state_dict_adapter import swap_glu_halves

    for piece in export_pieces(config):
        model = one_layer_model(config, piece)
        sharded = model.sharded_state_dict()
        if prefix:
            parameters = {name for name, _ in model.named_parameters()}
            sharded = {key: value for key, value in sharded.items() if key in parameters}
            replace_prefix_for_sharding(sharded, "", prefix)
        loaded = dist_checkpointing.load(sharded, str(checkpoint))
        model.load_state_dict(loaded, strict=not prefix)
        del loaded
        for key, tensor in local_weights(model):
            released, swap = released_of[key]
            if dtype is not None and not released.endswith(ROUTER_SUFFIX):
                tensor = tensor.to(dtype)
            yield released, swap_glu_halves(tensor) if swap else tensor
        del model


def _planned_sizes(config, released_of: dict, dtype=None) -> list[tuple[str, int]]:
    """(released key, bytes) in the order ``_checkpoint_tensors`` yields them (meta models)."""
    from models.hunyuan_image3.parallelize import export_pieces, local_weights, one_layer_model

    planned = []
    for piece in export_pieces(config):
        for key, tensor in local_weights(one_layer_model(config, piece, device="meta")):
            released = released_of[key][0]
            if dtype is not None and not released.endswith(ROUTER_SUFFIX):
                tensor = tensor.to(dtype)
            planned.append((released, tensor.numel() * tensor.element_size()))
    return planned


def run_export(args) -> dict:
    """The ``export`` command; returns a summary (also used by the tests)."""
    started = time.perf_counter()
    checkpoint, output = Path(args.checkpoint), Path(args.output)
    check_export_arguments(checkpoint, output, args.dry_run)
    import torch
    from megatron.core import dist_checkpointing

    from models.hunyuan_image3.parallelize import checkpoint_tensor_shapes, meta_full_model, read_checkpoint_info
    from models.hunyuan_image3.state_dict_adapter import check_key_sets, check_shapes

    record = read_checkpoint_info(checkpoint)
    info = start_parallel()
    config = model_config(record["hf_config"], torch_dtype(record["dtype"]))
    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    # A training checkpoint holds the EMA, the student, the fake network and optimizer state:
    # the first of its weight prefixes (the EMA's) is exported.
    prefix = (record.get("weight_prefixes") or [""])[0]
    found = {key[len(prefix):]: tuple(value.global_shape) for key, value in metadata.items() if key.startswith(prefix)}
    expected = checkpoint_tensor_shapes(config)
    hint = f" (architecture from {checkpoint}/mfmegatron_hunyuan_image3.json)"
    check_key_sets(found, expected, f"checkpoint {checkpoint}", hint)
    check_shapes(found, expected, f"checkpoint {checkpoint}", hint)
    image_head, released_of = _conversion_names(
        [name for name, _ in meta_full_model(config).named_parameters()], config)

    if config.is_student and config.student_conditioning != "tokens":
        # One line, also under --quiet: the folder is valid for mfmegatron only.
        print(f"{PROG} export: warning: this student adds its guidance / interval embeddings to <timestep>'s "
              f"row (student_conditioning={config.student_conditioning!r}); the official HunyuanImage 3.0 code "
              "cannot load it (it expects <guidance> / <timestep_r> tokens)", file=sys.stderr, flush=True)
    out_dtype = torch_dtype(args.dtype) if args.dtype else None
    planned = _planned_sizes(config, released_of, out_dtype)

    extra, copied = None, []  # the released folder's tensors that are not converted, copied through
    if args.copy_unconverted_from:
        _, extra_files = hf_folder(Path(args.copy_unconverted_from))
        exported = {key for key, _ in planned}
        copied = [key for key in extra_files if key not in exported]  # in the folder's index order
        extra = SafetensorsSource({key: extra_files[key] for key in copied})
        planned += [(key, extra.nbytes(key)) for key in copied]
    shards = plan_shards(planned, args.max_shard_size)
    names = shard_file_names(len(shards), HF_WEIGHTS)
    total = sum(nbytes for _, nbytes in planned)
    summary = {"tensors": len(planned), "bytes": total, "shards": names, "layout": info.describe(),
               "image_head": image_head, "copied": len(copied)}
    log(
        f"{PROG} export: {checkpoint} -> {output}: {len(planned)} tensors, {format_bytes(total)} in "
        f"{len(names)} shard(s) of at most {format_bytes(args.max_shard_size)}"
        + (f"; {summary['copied']} tensors copied from {args.copy_unconverted_from}" if extra else ""),
        args.quiet,
    )
    if args.dry_run:
        log("dry run: checkpoint matches its config; nothing written", args.quiet)
        return summary

    def tensors():
        yield from _checkpoint_tensors(checkpoint, config, released_of, out_dtype, prefix)
        for key in copied:
            yield key, extra.get(key)
        if extra is not None:
            extra.release()

    progress = Progress(total, "export", args.quiet)
    try:
        with staged_output(output) as staging:
            write_shards(staging, tensors(), planned, shards, HF_WEIGHTS, on_tensor=progress.update)
            (staging / "config.json").write_text(json.dumps(record["hf_config"], indent=2) + "\n")
            if args.copy_unconverted_from:
                _copy_other_files(Path(args.copy_unconverted_from), staging)
    finally:
        progress.close()
    summary["seconds"] = time.perf_counter() - started
    log(f"wrote {output} in {summary['seconds']:.1f} s", args.quiet)
    return summary


def _copy_other_files(folder: Path, output: Path) -> None:
    """The released folder's files other than weights and config.json (tokenizer, code,
    generation config), so the exported folder loads as the whole model."""
    for path in sorted(folder.iterdir()):
        if path.name in ("config.json", HF_WEIGHTS + ".index.json") or path.suffix == ".safetensors":
            continue
        if path.is_dir():
            shutil.copytree(path, output / path.name)
        else:
            shutil.copy2(path, output / path.name)


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
        "import", help="Hugging Face folder -> dist checkpoint",
        description="Convert a released-layout HunyuanImage 3.0 folder to a megatron dist checkpoint "
                    "(layout-independent: it loads at any TP / EP / PP size).",
    )
    imp.add_argument("--hf", required=True, metavar="DIR",
                     help="config.json plus model.safetensors.index.json and its shards (or one model.safetensors)")
    imp.add_argument("--output", required=True, metavar="DIR", help="the dist checkpoint directory to create (must be empty)")
    imp.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                     help="parameter dtype stored (default: bf16; the router stays float32)")
    for flag, what in (("--tensor-parallel-size", "tensor"), ("--expert-parallel-size", "expert"),
                       ("--pipeline-parallel-size", "pipeline")):
        imp.add_argument(flag, type=int, default=1, metavar="N",
                         help=f"under torchrun: the {what}-parallel size the ranks build and write from. In one "
                              f"process: only checked (the model must split N ways); the checkpoint is the same")
    imp.add_argument("--expert-tensor-parallel-size", type=int, default=None, metavar="N",
                     help="tensor-parallel size inside each expert (default: the tensor-parallel size)")
    imp.add_argument("--pipeline-layers", metavar="N,N,..",
                     help="layers per pipeline stage, e.g. 9,8,8,7 (default: an even split)")
    imp.add_argument("--dry-run", action="store_true",
                     help="check keys, shapes and layout on the meta device; read no tensor data, write nothing")
    imp.add_argument("--quiet", action="store_true", help="no progress output")

    exp = sub.add_parser(
        "export", help="dist checkpoint -> Hugging Face folder",
        description="Convert a dist checkpoint (saved at any layout) to the released layout: config.json, "
                    "model-0000k-of-0000n.safetensors shards and model.safetensors.index.json. Runs in one process.",
    )
    exp.add_argument("--checkpoint", required=True, metavar="DIR", help="a dist checkpoint written by import or training")
    exp.add_argument("--output", required=True, metavar="DIR", help="the folder to create (must be empty)")
    exp.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                     help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB). Peak memory is "
                          "about one shard plus one layer")
    exp.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="dtype of the written tensors (default: as stored in the checkpoint)")
    exp.add_argument("--copy-unconverted-from", metavar="DIR",
                     help="the released folder: copy its tensors that are not converted (VAE, vision tower, "
                          "aligner) and its other files, so the output loads as the whole model")
    exp.add_argument("--dry-run", action="store_true", help="check the checkpoint and print the shard plan; write nothing")
    exp.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv`` and runs the command; raises on errors (``main`` prints them)."""
    args = build_parser().parse_args(argv)
    return run_and_tear_down(lambda: run_import(args) if args.command == "import" else run_export(args))


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, run, argv, extra_error_kinds=[("models.hunyuan_image3.parallelize", "LayoutError")])


if __name__ == "__main__":
    sys.exit(main())
