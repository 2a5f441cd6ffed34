"""Checkpoint conversion: diffusers folders and original BFL files <-> megatron dist checkpoints.

A tiny random diffusers FLUX is written with ``save_pretrained`` and as an original single file
(the BFL layout, written out name by name below). One spawn of two gloo ranks imports it at TP=2,
PP=2 and TP=1 x DP=2, re-saves a loaded checkpoint at other pipeline splits and runs the forward
at TP=1 and TP=2 from the same checkpoint; one single-rank spawn does the single-process imports,
every export and the error cases. Comparisons happen here, in the pytest process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfmegatron.parallel import run_on_ranks
from tests.flux_fixtures import diffusers_flux, flux_batch, flux_inputs

FLUX_DEV_PARAMETERS = 11_901_408_320
PREFIX = "model.diffusion_model."


# --------------------------------------------------------------------------- the BFL layout, by hand


def bfl_state_dict(d: dict, num_double: int, num_single: int) -> dict:
    """A diffusers FLUX state dict in the original BFL layout, every name written out."""
    cat = torch.cat
    bfl = {}
    for s in ("weight", "bias"):
        bfl[f"img_in.{s}"] = d[f"x_embedder.{s}"]
        bfl[f"txt_in.{s}"] = d[f"context_embedder.{s}"]
        bfl[f"time_in.in_layer.{s}"] = d[f"time_text_embed.timestep_embedder.linear_1.{s}"]
        bfl[f"time_in.out_layer.{s}"] = d[f"time_text_embed.timestep_embedder.linear_2.{s}"]
        bfl[f"guidance_in.in_layer.{s}"] = d[f"time_text_embed.guidance_embedder.linear_1.{s}"]
        bfl[f"guidance_in.out_layer.{s}"] = d[f"time_text_embed.guidance_embedder.linear_2.{s}"]
        bfl[f"vector_in.in_layer.{s}"] = d[f"time_text_embed.text_embedder.linear_1.{s}"]
        bfl[f"vector_in.out_layer.{s}"] = d[f"time_text_embed.text_embedder.linear_2.{s}"]
        bfl[f"final_layer.linear.{s}"] = d[f"proj_out.{s}"]
        scale, shift = d[f"norm_out.linear.{s}"].chunk(2)
        bfl[f"final_layer.adaLN_modulation.1.{s}"] = cat([shift, scale])  # BFL: shift, scale
        for i in range(num_double):
            b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
            bfl[f"{b}img_mod.lin.{s}"] = d[f"{t}norm1.linear.{s}"]
            bfl[f"{b}txt_mod.lin.{s}"] = d[f"{t}norm1_context.linear.{s}"]
            bfl[f"{b}img_attn.qkv.{s}"] = cat([d[f"{t}attn.to_{x}.{s}"] for x in "qkv"])
            bfl[f"{b}txt_attn.qkv.{s}"] = cat([d[f"{t}attn.add_{x}_proj.{s}"] for x in "qkv"])
            bfl[f"{b}img_attn.proj.{s}"] = d[f"{t}attn.to_out.0.{s}"]
            bfl[f"{b}txt_attn.proj.{s}"] = d[f"{t}attn.to_add_out.{s}"]
            bfl[f"{b}img_mlp.0.{s}"] = d[f"{t}ff.net.0.proj.{s}"]
            bfl[f"{b}img_mlp.2.{s}"] = d[f"{t}ff.net.2.{s}"]
            bfl[f"{b}txt_mlp.0.{s}"] = d[f"{t}ff_context.net.0.proj.{s}"]
            bfl[f"{b}txt_mlp.2.{s}"] = d[f"{t}ff_context.net.2.{s}"]
        for i in range(num_single):
            b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            bfl[f"{b}linear1.{s}"] = cat([d[f"{t}attn.to_{x}.{s}"] for x in "qkv"] + [d[f"{t}proj_mlp.{s}"]])
            bfl[f"{b}linear2.{s}"] = d[f"{t}proj_out.{s}"]
            bfl[f"{b}modulation.lin.{s}"] = d[f"{t}norm.linear.{s}"]
    for i in range(num_double):
        b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        bfl[f"{b}img_attn.norm.query_norm.scale"] = d[f"{t}norm_q.weight"]
        bfl[f"{b}img_attn.norm.key_norm.scale"] = d[f"{t}norm_k.weight"]
        bfl[f"{b}txt_attn.norm.query_norm.scale"] = d[f"{t}norm_added_q.weight"]
        bfl[f"{b}txt_attn.norm.key_norm.scale"] = d[f"{t}norm_added_k.weight"]
    for i in range(num_single):
        b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
        bfl[f"{b}norm.query_norm.scale"] = d[f"{t}norm_q.weight"]
        bfl[f"{b}norm.key_norm.scale"] = d[f"{t}norm_k.weight"]
    return {k: v.contiguous().clone() for k, v in bfl.items()}


def read_safetensors_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _save_diffusers_file(state: dict, folder: Path, config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# --------------------------------------------------------------------------- rank functions


def _import(source_flag: str, source: Path, output: Path, *extra: str) -> dict:
    from tools.convert_flux import run

    return run(["import", source_flag, str(source), "--output", str(output), "--quiet", *extra])


def _forward(checkpoint: Path, tp: int):
    from mfmegatron.parallel import initialize_parallel
    from models.flux.parallelize import build_flux_model, flux_config_from_checkpoint, load_dist_checkpoint

    initialize_parallel(tensor_parallel_size=tp)
    config = flux_config_from_checkpoint(checkpoint, tensor_model_parallel_size=tp, use_cpu_initialization=True)
    model = build_flux_model(config)
    load_dist_checkpoint(model, checkpoint)
    with torch.no_grad():
        return model(flux_inputs(flux_batch()))


def _resave(checkpoint: Path, output: Path, stage_blocks: tuple[int, int]) -> None:
    """Training's path: load at PP=2 with the given split, save again."""
    from mfmegatron.parallel import initialize_parallel
    from models.flux.parallelize import (
        build_flux_model,
        flux_config_from_checkpoint,
        load_dist_checkpoint,
        read_checkpoint_info,
        save_dist_checkpoint,
    )

    initialize_parallel(pipeline_parallel_size=2)
    config = flux_config_from_checkpoint(
        checkpoint, pipeline_model_parallel_size=2, pipeline_stage_blocks=stage_blocks, use_cpu_initialization=True
    )
    model = build_flux_model(config)
    load_dist_checkpoint(model, checkpoint)
    save_dist_checkpoint(model, output, read_checkpoint_info(checkpoint)["diffusers_config"])


def _sharding(tp: int, pp: int) -> dict:
    """(checkpoint key -> local shape, global shape, global offset, replica id) of a few tensors."""
    from megatron.core import parallel_state

    from mfmegatron.parallel import initialize_parallel
    from models.flux.config import tiny_flux_config
    from models.flux.parallelize import build_flux_model

    initialize_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    config = tiny_flux_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              pipeline_dtype=torch.float32, pipeline_stage_blocks=(1, 3) if pp > 1 else None)
    model = build_flux_model(config)
    report = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
              "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
    for local_key, value in model.sharded_state_dict().items():
        if local_key.endswith(("weight", "bias")):
            report[value.key] = (local_key, tuple(value.local_shape), tuple(value.global_shape),
                                 tuple(value.global_offset), value.replica_id)
    return report


def _two_ranks(work: str) -> dict:
    from mfmegatron.parallel import initialize_parallel

    work = Path(work)
    initialize_parallel()  # the tool reuses this world and sets its own layout
    hf = work / "hf"
    _import("--diffusers", hf, work / "ck_tp2", "--dtype", "fp32", "--tensor-parallel-size", "2")
    _import("--diffusers", hf, work / "ck_pp2", "--dtype", "fp32", "--pipeline-parallel-size", "2")
    _import("--diffusers", hf, work / "ck_tp1_dp2", "--dtype", "fp32")
    _resave(work / "ck_tp1_dp2", work / "ck_pp2_3_1", (3, 1))
    _resave(work / "ck_tp1_dp2", work / "ck_pp2_1_3", (1, 3))
    return {
        "tp1": _forward(work / "ck_tp1_dp2", 1),
        "tp2": _forward(work / "ck_tp1_dp2", 2),
        "sharding_tp2": _sharding(2, 1),
        "sharding_pp2": _sharding(1, 2),
    }


def _expect_error(kind, argv: list[str]) -> str:
    from tools.convert_flux import run

    try:
        run(argv)
    except kind as error:
        return str(error)
    raise AssertionError(f"{argv} did not raise {kind.__name__}")


def _one_rank(work: str, exports: list[str]) -> dict:
    from megatron.core import dist_checkpointing

    from mfmegatron.parallel import initialize_parallel
    from models.flux.config import flux_dev_config, tiny_flux_config
    from models.flux.parallelize import (
        build_flux_model,
        full_parameter_shapes,
        load_dist_checkpoint,
        meta_full_model,
    )
    from models.flux.state_dict_adapter import CheckpointMismatchError
    from tools.convert_flux import main, run

    work = Path(work)
    initialize_parallel()
    results = {}
    results["import_tp1"] = _import("--diffusers", work / "hf", work / "ck_tp1", "--dtype", "fp32")
    _import("--original", work / "flux1-tiny.safetensors", work / "ck_bfl", "--dtype", "fp32",
            "--config", str(work / "hf" / "config.json"))
    _import("--diffusers", work / "pipe", work / "ck_bf16")  # default dtype: bf16
    results["dry_run"] = run(["import", "--diffusers", str(work / "hf"), "--output", str(work / "unused"),
                              "--dry-run", "--quiet", "--tensor-parallel-size", "4", "--pipeline-parallel-size", "4"])
    for name in exports + ["ck_tp1", "ck_bfl", "ck_bf16"]:
        run(["export", "--checkpoint", str(work / name), "--output", str(work / f"export_{name}"),
             "--max-shard-size", "150KB", "--quiet"])
    tp1 = dist_checkpointing.load_plain_tensors(str(work / "ck_tp1"))
    bfl = dist_checkpointing.load_plain_tensors(str(work / "ck_bfl"))
    results["bfl_equals_diffusers_import"] = tp1.keys() == bfl.keys() and all(
        torch.equal(tp1[k], bfl[k]) for k in tp1 if torch.is_tensor(tp1[k])
    )
    results["checkpoint_keys"] = sorted(k for k, v in tp1.items() if torch.is_tensor(v))

    # Errors: shapes, keys, layout, paths.
    errors = {}
    bad = work / "bad"
    errors["shape"] = _expect_error(CheckpointMismatchError, ["import", "--diffusers", str(bad / "wrong_shape"),
                                                             "--output", str(work / "x1"), "--quiet"])
    errors["missing"] = _expect_error(CheckpointMismatchError, ["import", "--diffusers", str(bad / "missing_key"),
                                                               "--output", str(work / "x2"), "--quiet"])
    errors["bfl_shape"] = _expect_error(CheckpointMismatchError, [
        "import", "--original", str(bad / "wrong_linear1.safetensors"), "--config", "tiny",
        "--output", str(work / "x3"), "--quiet"])
    # Import writes while it reads (one block at a time): after this error no output stays.
    errors["bfl_shape_left"] = sorted(p.name for p in work.glob("x3*"))
    errors["bfl_no_config"] = _expect_error(CheckpointMismatchError, [
        "import", "--original", str(work / "flux1-tiny.safetensors"), "--output", str(work / "x4"), "--quiet"])
    errors["layout"] = _expect_error(Exception, ["import", "--diffusers", str(work / "hf"), "--output",
                                                 str(work / "x5"), "--tensor-parallel-size", "3", "--quiet"])
    errors["not_empty"] = _expect_error(Exception, ["import", "--diffusers", str(work / "hf"), "--output",
                                                    str(work / "hf"), "--quiet"])
    for name, argv in (("export_missing", ["export", "--checkpoint"]), ("original_missing", ["import", "--original"])):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            errors[name + "_code"] = main(argv + [str(work / "nowhere"), "--output", str(work / "x6")])
        errors[name] = stderr.getvalue()
    try:  # a checkpoint loaded into a model of another architecture
        model = build_flux_model(tiny_flux_config(pooled_projection_dim=20))
        load_dist_checkpoint(model, work / "ck_tp1")
        errors["load"] = "no error"
    except CheckpointMismatchError as error:
        errors["load"] = str(error)
    results["errors"] = errors

    # The full FLUX.1-dev, shapes only.
    results["flux_dev_shapes"] = full_parameter_shapes(meta_full_model(flux_dev_config()))
    return results


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from safetensors.torch import save_file

    work = tmp_path_factory.mktemp("conversion")
    reference = diffusers_flux()
    reference.save_pretrained(str(work / "hf"), max_shard_size="200KB")  # sharded, with an index
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    config = dict(reference.config)
    # A pipeline folder with a single-file bf16 transformer (the import's default dtype).
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    _save_diffusers_file(bf16, work / "pipe" / "transformer", config)
    # The original single file, with the prefix and a non-transformer tensor it must skip.
    bfl = {PREFIX + k: v for k, v in bfl_state_dict(state, 2, 2).items()}
    bfl["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    save_file(bfl, str(work / "flux1-tiny.safetensors"))
    # Broken inputs.
    wrong = dict(state)
    wrong["transformer_blocks.1.attn.to_k.weight"] = wrong["transformer_blocks.1.attn.to_k.weight"][:48]
    _save_diffusers_file(wrong, work / "bad" / "wrong_shape", config)
    missing = {k: v for k, v in state.items() if k != "single_transformer_blocks.0.proj_out.bias"}
    missing["transformer_blocks.0.attn.extra.weight"] = torch.zeros(1)
    _save_diffusers_file(missing, work / "bad" / "missing_key", config)
    bad_bfl = dict(bfl)
    bad_bfl[PREFIX + "single_blocks.1.linear1.weight"] = bad_bfl[PREFIX + "single_blocks.1.linear1.weight"][:-8]
    save_file(bad_bfl, str(work / "bad" / "wrong_linear1.safetensors"))

    two = run_on_ranks(_two_ranks, 2, str(work), timeout=300)
    exports = ["ck_tp2", "ck_pp2", "ck_tp1_dp2", "ck_pp2_3_1", "ck_pp2_1_3"]
    one = run_on_ranks(_one_rank, 1, str(work), exports, timeout=300)[0]
    with torch.no_grad():
        expected = reference(**flux_batch()).sample
    return {"work": work, "state": state, "bf16": bf16, "two": two, "one": one, "expected": expected,
            "reference": reference}


# --------------------------------------------------------------------------- round trips


def test_diffusers_import_export_is_bit_exact(converted):
    work, state = converted["work"], converted["state"]
    # Imported one block at a time: each piece (a block; the first with the embedders, the last
    # with the final layer) loaded exactly once while megatron's writer went through the plan.
    summary = converted["one"]["import_tp1"]
    assert summary["pieces"] == summary["piece_loads"] == 4  # 2 double + 2 single blocks
    exported = read_safetensors_folder(work / "export_ck_tp1")
    assert exported.keys() == state.keys()
    for key, tensor in state.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    # Sharded like save_pretrained: several files, each within the limit, and an index naming them.
    index = json.loads((work / "export_ck_tp1" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    files = sorted((work / "export_ck_tp1").glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"]) == set(state)
    assert {f.name for f in files} == set(index["weight_map"].values())
    biggest = max(t.numel() * t.element_size() for t in state.values())
    assert all(f.stat().st_size <= max(150_000, biggest) + 20_000 for f in files)


def test_exported_folder_loads_in_diffusers_with_the_same_output(converted):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(str(converted["work"] / "export_ck_tp1")).eval()
    def architecture(config):
        return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))

    assert architecture(model.config) == architecture(converted["reference"].config)
    with torch.no_grad():
        out = model(**flux_batch()).sample
    assert torch.equal(out, converted["expected"])


def test_pipeline_folder_single_file_bf16_default_round_trips(converted):
    exported = read_safetensors_folder(converted["work"] / "export_ck_bf16")
    assert exported.keys() == converted["bf16"].keys()
    for key, tensor in converted["bf16"].items():
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], tensor), key
    record = json.loads((converted["work"] / "ck_bf16" / "mfmegatron_flux.json").read_text())
    assert record["dtype"] == "bfloat16"


def test_original_bfl_file_imports_to_the_diffusers_weights(converted):
    assert converted["one"]["bfl_equals_diffusers_import"]
    exported = read_safetensors_folder(converted["work"] / "export_ck_bfl")
    for key, tensor in converted["state"].items():
        assert torch.equal(exported[key], tensor), key


@pytest.mark.parametrize("name", ["ck_tp2", "ck_pp2", "ck_tp1_dp2", "ck_pp2_3_1", "ck_pp2_1_3"])
def test_checkpoints_saved_at_other_layouts_export_bit_exact(converted, name):
    work = converted["work"]
    reference = read_safetensors_folder(work / "export_ck_tp1")
    exported = read_safetensors_folder(work / f"export_{name}")
    assert exported.keys() == reference.keys()
    for key in reference:
        assert exported[key].dtype == reference[key].dtype and torch.equal(exported[key], reference[key]), key


def test_checkpoint_keys_are_global_and_layout_independent(converted):
    keys = converted["one"]["checkpoint_keys"]
    assert "double_blocks.1.img_attn.linear_qkv.weight" in keys
    assert "single_blocks.1.linear_mlp_out.bias" in keys
    assert not any("_extra_state" in k for k in keys)


def test_sharded_state_dict_splits_tp_weights_and_replicates_the_rest_once(converted):
    for rank in converted["two"]:
        r, tp_rank = rank["sharding_tp2"], rank["sharding_tp2"]["tp_rank"]
        # Column-parallel QKV: rows split over TP (per-head layout keeps whole heads per rank).
        _, local, full, offset, replica = r["double_blocks.0.img_attn.linear_qkv.weight"]
        assert (local, full, offset, replica) == ((96, 64), (192, 64), (96 * tp_rank, 0), (0, 0, 0))
        # Row-parallel: columns split, bias replicated and written by TP rank 0 only.
        _, local, full, offset, _ = r["single_blocks.1.linear_mlp_out.weight"]
        assert (local, full, offset) == ((64, 128), (64, 256), (0, 128 * tp_rank))
        assert r["single_blocks.1.linear_mlp_out.bias"][4] == (0, tp_rank, 0)
        # QK RMSNorms and plain torch.nn.Linears: whole tensors, replica id names the TP rank.
        for key in ("double_blocks.1.txt_attn.k_layernorm.weight", "single_blocks.0.attn.q_layernorm.weight",
                    "img_in.weight", "time_in.mlp.linear_2.bias", "final_proj.weight"):
            _, local, full, offset, replica = r[key]
            assert local == full and set(offset) == {0} and replica == (0, tp_rank, 0), key
    # PP=2 split (1, 3): stage 1's local double_blocks.0 is saved as global double_blocks.1.
    stages = {rank["sharding_pp2"]["pp_rank"]: rank["sharding_pp2"] for rank in converted["two"]}
    assert stages[1]["double_blocks.1.img_mod.linear.weight"][0] == "double_blocks.0.img_mod.linear.weight"
    assert "double_blocks.0.img_mod.linear.weight" in stages[0] and "img_in.weight" in stages[0]
    assert {"single_blocks.1.attn.linear_qkv.bias", "final_proj.weight"} <= set(stages[1])
    assert not set(stages[0]) - {"tp_rank", "pp_rank"} & set(stages[1])


def test_loading_the_tp1_checkpoint_at_tp2_gives_the_same_forward(converted):
    for rank in converted["two"]:
        torch.testing.assert_close(rank["tp2"], rank["tp1"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["tp2"], converted["expected"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the full FLUX.1-dev


def test_flux_dev_every_diffusers_key_maps_to_our_parameter_and_back(converted):
    from diffusers import FluxTransformer2DModel

    from models.flux.config import flux_dev_config
    from models.flux.state_dict_adapter import (
        bfl_shapes,
        diffusers_config_from_flux,
        diffusers_shapes,
        from_megatron,
        infer_diffusers_config_from_bfl,
        to_megatron,
    )

    with torch.device("meta"):
        reference = FluxTransformer2DModel(guidance_embeds=True)
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = converted["one"]["flux_dev_shapes"]
    config = flux_dev_config()

    mapped = {k: tuple(t.shape) for k, t in to_megatron(lambda k: torch.empty(theirs[k], device="meta"), config)}
    assert mapped == ours
    back = {k: tuple(t.shape) for k, t in from_megatron(lambda k: torch.empty(ours[k], device="meta"), config)}
    assert back == theirs
    count = sum(torch.Size(s).numel() for s in ours.values())
    assert count == sum(torch.Size(s).numel() for s in theirs.values()) == FLUX_DEV_PARAMETERS
    # The BFL layout of the same model: same parameter count, and its config is read back from it.
    bfl = bfl_shapes(config, diffusers_shapes(ours, config))
    assert sum(torch.Size(s).numel() for s in bfl.values()) == FLUX_DEV_PARAMETERS
    assert bfl["single_blocks.37.linear1.weight"] == (3 * 3072 + 4 * 3072, 3072)
    assert bfl["final_layer.adaLN_modulation.1.weight"] == (2 * 3072, 3072)
    assert infer_diffusers_config_from_bfl(bfl) == diffusers_config_from_flux(config)


def test_dry_run_checks_a_layout_without_writing(converted):
    summary = converted["one"]["dry_run"]
    assert summary["parameters"] == sum(t.numel() for t in converted["state"].values())
    assert not (converted["work"] / "unused").exists()


# --------------------------------------------------------------------------- errors


def test_wrong_shape_names_the_key_and_both_shapes(converted):
    errors = converted["one"]["errors"]
    assert "transformer_blocks.1.attn.to_k.weight" in errors["shape"]
    assert "(48, 64)" in errors["shape"] and "(64, 64)" in errors["shape"]
    assert "single_blocks.1.linear1.weight" in errors["bfl_shape"]
    assert "(440, 64)" in errors["bfl_shape"] and "(448, 64)" in errors["bfl_shape"]
    assert errors["bfl_shape_left"] == []
    assert "vector_in.linear_1.weight" in errors["load"]
    assert "(64, 24)" in errors["load"] and "(64, 20)" in errors["load"]


def test_missing_and_unexpected_keys_are_listed(converted):
    message = converted["one"]["errors"]["missing"]
    assert "1 missing: 'single_transformer_blocks.0.proj_out.bias'" in message
    assert "1 unexpected: 'transformer_blocks.0.attn.extra.weight'" in message


def test_layout_config_and_output_errors_are_clear(converted):
    errors = converted["one"]["errors"]
    assert "tp=3" in errors["layout"]
    assert "--config" in errors["bfl_no_config"] or "pass a config" in errors["bfl_no_config"]
    assert "not an empty directory" in errors["not_empty"]
    for name, flag in (("export_missing", "--checkpoint"), ("original_missing", "--original")):
        assert errors[name + "_code"] == 2
        work = converted["work"]
        assert errors[name] == f"mfmegatron-convert-flux: error: {flag} {work / 'nowhere'}: no such file or directory\n"


def test_command_line_entry_point_reports_a_missing_path_in_one_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    absent = tmp_path / "absent"
    result = subprocess.run(
        [sys.executable, "-m", "tools.convert_flux", "import", "--diffusers", str(absent), "--output", str(tmp_path / "out")],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 2
    assert result.stderr == f"mfmegatron-convert-flux: error: --diffusers {absent}: no such file or directory\n"


def test_an_error_after_megatron_is_loaded_is_one_line_without_warnings(tmp_path):
    # Export imports megatron-core (and its warnings about TE/apex/CUDA) before it finds out.
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tools.convert_flux", "export", "--checkpoint", str(tmp_path / "empty"),
         "--output", str(tmp_path / "out")],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 2
    assert result.stderr == (f"mfmegatron-convert-flux: error: {tmp_path / 'empty'} is not an mfmegatron FLUX "
                             "checkpoint (no mfmegatron_flux.json)\n")


def test_under_torchrun_only_rank_0_prints_the_error(tmp_path):
    from mfmegatron.parallel.spawn import free_port

    root = Path(__file__).resolve().parents[1]
    absent = tmp_path / "absent"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "tools.convert_flux", "import", "--diffusers", str(absent), "--output", str(tmp_path / "out")],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode != 0  # the ranks exit with 2; torchrun reports the failure
    error = f"mfmegatron-convert-flux: error: --diffusers {absent}: no such file or directory"
    assert (result.stdout + result.stderr).count(error) == 1, result.stderr
