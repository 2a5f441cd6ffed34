"""HunyuanImage 3.0 conversion (tools/convert_hunyuan_image3.py), layout validation, EP x TP.

A tiny model in the released layout (3 layers, 8 experts, the image head with the few-step
student's ``guidance_emb`` / ``timestep_r_emb`` (official Instruct-Distil names), random weights) is
written as a sharded Hugging Face folder with keys we do not convert (VAE, vision tower, aligner)
and a tokenizer file. One 4-rank spawn imports it under torchrun-like
ranks at several layouts, checks that bad layouts fail the same way on every rank, and runs EP=2 x
TP=2 (+SP) against the one-rank model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mfmegatron.parallel import parallel_context, run_on_ranks
from tests.test_hunyuan_image3 import BATCH, TP_SEQ, _full_grads, _input_ids, _loss_weights

LAYERS = 3  # odd: pipeline parallel 2 needs an explicit stage list
# Written by the 4-rank spawn: layout name -> import arguments.
RANK_LAYOUTS = {
    "ep2": ["--expert-parallel-size", "2"],
    "tp2": ["--tensor-parallel-size", "2"],
    "pp2": ["--pipeline-parallel-size", "2", "--pipeline-layers", "2,1"],
    "ep2_tp2": ["--expert-parallel-size", "2", "--tensor-parallel-size", "2"],
}
UNCONVERTED = {  # released keys outside what we convert, tiny shapes
    "vae.decoder.conv_in.weight": (4, 2, 3, 3),
    "vision_model.embeddings.patch_embedding.weight": (8, 12),
    "vision_aligner.linear_1.weight": (64, 8),
}


def _tiny_config(**overrides):
    """The tiny model of the folder, with its image head (the sizes the released config.json does
    not carry at their released values: sinusoid 256, 32 GroupNorm groups)."""
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    settings = dict(num_layers=LAYERS, image_path=True, patch_embed_hidden_dim=32, latent_channels=4,
                    timestep_embedding_dim=256, image_norm_groups=32)
    settings.update(overrides)
    return tiny_hunyuan_image3_config(**settings)


def _released_weights(config) -> dict:
    """Random weights under the released names (norm-like vectors near 1, matrices of std 0.3:
    large enough that routing, attention and norms all matter), plus unconverted keys."""
    from models.hunyuan_image3.parallelize import meta_full_model
    from models.hunyuan_image3.state_dict_adapter import from_megatron, image_head_shapes

    generator = torch.Generator().manual_seed(7)
    ours = {}
    with parallel_context():
        shapes = {name: param.shape for name, param in meta_full_model(config).named_parameters()}
    for name, shape in shapes.items():
        if len(shape) == 1:
            ours[name] = 1 + 0.2 * torch.randn(shape, generator=generator)
        else:
            ours[name] = 0.3 * torch.randn(shape, generator=generator)
    released = from_megatron(ours, config, image_head=True)
    assert set(image_head_shapes(config)) < set(released)
    for key, shape in UNCONVERTED.items():
        released[key] = torch.randn(shape, generator=generator)
    return released


def _write_hf_folder(folder: Path, tensors: dict, hf_config: dict, max_shard_size: int = 40_000) -> None:
    from mfmegatron.conversion import plan_shards, write_shards

    folder.mkdir(parents=True)
    planned = [(k, v.numel() * v.element_size()) for k, v in tensors.items()]
    shards = plan_shards(planned, max_shard_size)
    write_shards(folder, tensors.items(), planned, shards, "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    (folder / "tokenizer.json").write_text('{"tiny": true}\n')


def _read_hf_folder(folder: Path) -> dict:
    """Every tensor of a released-layout folder: its index and shards, or its one file."""
    from safetensors.torch import load_file

    if not (folder / "model.safetensors.index.json").exists():
        return load_file(str(folder / "model.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name in sorted(set(index.values())):
        tensors.update(load_file(str(folder / name)))
    assert set(tensors) == set(index)
    return tensors


def _convert(*argv: str) -> dict:
    from tools.convert_hunyuan_image3 import run

    return run([*argv, "--quiet"])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The tiny released-layout folder, its tensors, and the trunk's weights under our names."""
    from models.hunyuan_image3.state_dict_adapter import hf_config_from_config, to_megatron

    config = _tiny_config(cfg_distilled=True, use_meanflow=True)  # a "tokens" student: the official layout
    tensors = _released_weights(config)
    assert {"guidance_emb.mlp.2.bias", "timestep_r_emb.mlp.0.weight"} < set(tensors)
    folder = tmp_path_factory.mktemp("hunyuan_hf") / "released"
    hf_config = hf_config_from_config(config)
    assert hf_config["cfg_distilled"] and hf_config["use_meanflow"]
    _write_hf_folder(folder, tensors, hf_config)
    ours, _ = to_megatron(tensors, _tiny_config(image_path=False))
    return {"folder": folder, "tensors": tensors, "hf_config": hf_config, "ours": ours, "root": folder.parent}


# --------------------------------------------------------------------------- one process


def test_import_export_round_trip_is_bit_exact_with_unconverted_keys_copied(released, capsys):
    """Import in one process, export with --copy-unconverted-from: every tensor of the released
    folder comes back bit-exact (trunk and image head converted, VAE / vision copied), in shards
    with an index, with the same config.json and the tokenizer file."""
    root = released["root"]
    summary = _convert("import", "--hf", str(released["folder"]), "--output", str(root / "ck"), "--dtype", "fp32")
    assert summary["skipped"] == {"vae": 1, "vision_model": 1, "vision_aligner": 1} and summary["image_head"]
    # Written one layer at a time: each piece (a layer, the first / last with the parts before /
    # after the layers) loaded exactly once while megatron's writer went through the plan.
    assert summary["pieces"] == summary["piece_loads"] == LAYERS
    assert (root / "ck" / "mfmegatron_hunyuan_image3.json").is_file()
    assert not (root / "ck.incomplete").exists()
    exported = _convert("export", "--checkpoint", str(root / "ck"), "--output", str(root / "hf_back"),
                        "--max-shard-size", "30KB", "--copy-unconverted-from", str(released["folder"]))
    assert len(exported["shards"]) > 2 and exported["copied"] == 3
    back = _read_hf_folder(root / "hf_back")
    assert set(back) == set(released["tensors"])
    for key, value in released["tensors"].items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert json.loads((root / "hf_back" / "config.json").read_text()) == released["hf_config"]
    assert (root / "hf_back" / "tokenizer.json").read_text() == '{"tiny": true}\n'
    assert "export: warning" not in capsys.readouterr().err  # the official ("tokens") student layout
    # Without --copy-unconverted-from: exactly the converted keys.
    _convert("export", "--checkpoint", str(root / "ck"), "--output", str(root / "converted_only"))
    assert set(_read_hf_folder(root / "converted_only")) == set(released["tensors"]) - set(UNCONVERTED)


def test_embedding_student_round_trips_with_its_config_and_export_warns_once(tmp_path, capsys):
    """The "embedding" student (ours, not loadable by the official code): its config.json fields
    (official ``cfg_distilled`` / ``use_meanflow``, our ``mfmegatron_student_conditioning``)
    and every tensor come back bit for bit; export says once, in one line, that the official code
    cannot load it (even with --quiet). A teacher's config.json has no student fields."""
    from models.hunyuan_image3.state_dict_adapter import config_from_hf, hf_config_from_config

    assert not {"cfg_distilled", "use_meanflow", "mfmegatron_student_conditioning"} & set(
        hf_config_from_config(_tiny_config()))
    config = _tiny_config(cfg_distilled=True, use_meanflow=True, student_conditioning="embedding")
    tensors = {k: v for k, v in _released_weights(config).items() if k not in UNCONVERTED}
    hf_config = hf_config_from_config(config)
    assert hf_config["mfmegatron_student_conditioning"] == "embedding"
    back_config = config_from_hf(hf_config)
    assert (back_config.cfg_distilled, back_config.use_meanflow, back_config.student_conditioning) == (
        True, True, "embedding")
    _write_hf_folder(tmp_path / "hf", tensors, hf_config)
    _convert("import", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"), "--dtype", "fp32")
    _convert("export", "--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "back"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "official HunyuanImage 3.0 code cannot load it" in warnings[0]
    back = _read_hf_folder(tmp_path / "back")
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == hf_config


def test_progress_and_summary_go_to_the_terminal(released, tmp_path, capsys):
    from tools.convert_hunyuan_image3 import run

    run(["import", "--hf", str(released["folder"]), "--output", str(tmp_path / "ck"), "--dry-run",
         "--expert-parallel-size", "4", "--tensor-parallel-size", "2"])
    err = capsys.readouterr().err
    assert "mfmegatron-convert-hunyuan-image3 import:" in err
    assert "skipped 3 tensors not converted" in err and "vae.*: 1" in err and "dry run" in err
    assert not (tmp_path / "ck").exists()


def _main_error(capsys, *argv: str) -> str:
    from tools.convert_hunyuan_image3 import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("mfmegatron-convert-hunyuan-image3: error: "), err
    return err


def _broken_copy(released, tmp_path: Path, change) -> Path:
    tensors = dict(released["tensors"])
    change(tensors)
    folder = tmp_path / "broken"
    _write_hf_folder(folder, tensors, released["hf_config"])
    return folder


def _assert_nothing_written(output: Path) -> None:
    assert not output.exists() and not output.with_name(output.name + ".incomplete").exists()


def test_input_errors_are_one_line_and_write_nothing(released, tmp_path, capsys):
    output = tmp_path / "out"
    key = "model.layers.1.mlp.experts.5.down_proj.weight"

    def wrong_shape(t):
        t[key] = torch.zeros(64, 31)

    err = _main_error(capsys, "import", "--hf", str(_broken_copy(released, tmp_path / "a", wrong_shape)),
                      "--output", str(output))
    assert f"'{key}' has shape (64, 31) but the model expects (64, 32)" in err
    _assert_nothing_written(output)

    err = _main_error(capsys, "import", "--hf", str(_broken_copy(released, tmp_path / "b", lambda t: t.pop(key))),
                      "--output", str(output))
    assert "1 missing" in err and key in err
    _assert_nothing_written(output)

    def unknown(t):
        t["model.layers.0.mlp.experts.5.extra_proj.weight"] = torch.zeros(2)

    err = _main_error(capsys, "import", "--hf", str(_broken_copy(released, tmp_path / "c", unknown)),
                      "--output", str(output))
    assert "1 unexpected" in err and "extra_proj" in err
    _assert_nothing_written(output)

    # A shard shorter than its header says (an interrupted download).
    folder = _broken_copy(released, tmp_path / "d", lambda t: None)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size - 100)
    err = _main_error(capsys, "import", "--hf", str(folder), "--output", str(output))
    assert f"{shard} is truncated: {size - 100} bytes, but its header describes {size}" in err
    _assert_nothing_written(output)

    err = _main_error(capsys, "import", "--hf", str(released["folder"]), "--output", str(output),
                      "--tensor-parallel-size", "4")
    assert "tensor parallel 4 does not divide the 2 KV groups" in err
    err = _main_error(capsys, "export", "--checkpoint", str(released["folder"]), "--output", str(output))
    assert "not a complete mfmegatron HunyuanImage 3.0 checkpoint" in err
    _assert_nothing_written(output)


def test_a_shape_error_met_while_saving_is_one_line_and_leaves_nothing(released, tmp_path, capsys, monkeypatch):
    """Import reads each layer while megatron's writer is saving: an error there (here a shape that
    does not fit, raised by the second layer) reaches the command as itself, one line, and the
    staging folder goes (torch.distributed.checkpoint wraps it; the wrapper is unpacked)."""
    from models.hunyuan_image3 import parallelize
    from models.hunyuan_image3.state_dict_adapter import CheckpointMismatchError

    real = parallelize.load_weights

    def failing_on_layer_1(model, get_full, on_tensor=None):
        if model.layer_range == (1, 2):
            raise CheckpointMismatchError("layers.1.x: the checkpoint tensor has shape (1,), the model expects (2,)")
        return real(model, get_full, on_tensor)

    monkeypatch.setattr(parallelize, "load_weights", failing_on_layer_1)
    err = _main_error(capsys, "import", "--hf", str(released["folder"]), "--output", str(tmp_path / "ck"), "--quiet")
    assert err.endswith("layers.1.x: the checkpoint tensor has shape (1,), the model expects (2,)"), err
    _assert_nothing_written(tmp_path / "ck")


def test_a_failure_while_writing_leaves_no_complete_looking_output(released, tmp_path, monkeypatch):
    """Export fails after some shards are written: neither the output nor its staging folder stays."""
    import tools.convert_hunyuan_image3 as cli

    _convert("import", "--hf", str(released["folder"]), "--output", str(tmp_path / "ck"), "--dtype", "fp32")
    real = cli._checkpoint_tensors

    def failing(*args, **kwargs):
        for count, pair in enumerate(real(*args, **kwargs)):
            if count == 40:
                raise OSError("disk full")
            yield pair

    monkeypatch.setattr(cli, "_checkpoint_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        _convert("export", "--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "hf"),
                 "--max-shard-size", "20KB")
    _assert_nothing_written(tmp_path / "hf")


def test_image_head_keys_and_sizes():
    """The adapter's image-head names and shapes (official UNetDown / UNetUp / ResBlock /
    TimestepEmbedder): the released sizes add up to 340,402,208; they convert as identity renames
    when the model has them and pass through as ``rest`` when it does not."""
    from models.hunyuan_image3.config import hunyuan_image3_config
    from models.hunyuan_image3.state_dict_adapter import from_megatron, image_head_shapes, to_megatron

    shapes = image_head_shapes(hunyuan_image3_config())

    def count(prefix):
        return sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith(prefix))

    assert count("patch_embed.") == 226_819_072 and count("final_layer.") == 60_081_184
    assert count("timestep_emb.") == count("time_embed.") == count("time_embed_2.") == 17_833_984
    assert not any(k.startswith(("guidance_emb.", "timestep_r_emb.")) for k in shapes)
    student = image_head_shapes(hunyuan_image3_config(cfg_distilled=True, use_meanflow=True))
    assert set(student) - set(shapes) == {f"{m}.mlp.{i}.{p}" for m in ("guidance_emb", "timestep_r_emb")
                                          for i in (0, 2) for p in ("weight", "bias")}
    assert sum(torch.Size(s).numel() for s in student.values()) == 340_402_208 + 2 * 17_833_984
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 340_402_208
    assert shapes["patch_embed.model.1.in_layers.2.weight"] == (4096, 1024, 3, 3)
    assert shapes["final_layer.model.1.2.weight"] == (32, 1024, 3, 3)

    config = _tiny_config()
    released = _released_weights(config)
    ours, rest = to_megatron(released, config, image_head=True)
    assert set(rest) == set(UNCONVERTED)
    assert all(torch.equal(ours[k], released[k]) for k in image_head_shapes(config))
    back = from_megatron(ours, config, image_head=True)
    assert set(back) == set(released) - set(UNCONVERTED)
    ours, rest = to_megatron(released, config)
    assert set(rest) == set(UNCONVERTED) | set(image_head_shapes(config))


def test_released_shapes_from_the_config_equal_the_built_modules():
    """The import checks a folder against ``released_shapes`` (the config alone: a rank's model
    holds only its experts); they must be the full model's shapes, key for key."""
    from models.hunyuan_image3.config import hunyuan_image3_config
    from models.hunyuan_image3.parallelize import meta_full_model
    from models.hunyuan_image3.state_dict_adapter import key_pairs, released_shapes

    for config in (_tiny_config(), _tiny_config(image_path=False), hunyuan_image3_config(num_layers=2),
                   _tiny_config(cfg_distilled=True, use_meanflow=True),
                   _tiny_config(use_meanflow=True, student_conditioning="embedding")):
        with parallel_context():
            built = {name: tuple(p.shape) for name, p in meta_full_model(config).named_parameters()}
        shapes = released_shapes(config, config.image_path)
        assert len(shapes) == len(built)
        for released, ours, _ in key_pairs(config, config.image_path):
            assert shapes[released] == built[ours], released


def test_layout_validation_messages():
    from models.hunyuan_image3.config import hunyuan_image3_config
    from models.hunyuan_image3.parallelize import LayoutError, check_layout, pipeline_layer_range

    config = _tiny_config()
    cases = [
        (dict(tp=4, sequence_parallel=True), "tensor parallel 4 does not divide the 2 KV groups"),
        (dict(ep=3), "expert parallel 3 does not divide the 8 experts"),
        (dict(pp=2), "pipeline parallel 2 does not divide the 3 layers (give an explicit stage list, "
                     "e.g. pipeline_layers=[2, 1])"),
        (dict(pp=2, pipeline_layers=(1, 1)), "pipeline_layers [1, 1] must give each of the 2 stages"),
        (dict(tp=2, sequence_parallel=True, etp=3), "expert tensor parallel 3 does not divide the expert width 32"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LayoutError) as caught:
            check_layout(config, **kwargs)
        assert message in str(caught.value) and "\n" not in str(caught.value), (kwargs, str(caught.value))
    check_layout(config, tp=2, sequence_parallel=False, seq_length=9)  # any length without SP
    with pytest.raises(LayoutError, match="length 9 is not a multiple"):
        check_layout(config, tp=2, sequence_parallel=True, seq_length=9)
    check_layout(config, tp=2, ep=8, pp=3, sequence_parallel=True, seq_length=10)
    check_layout(hunyuan_image3_config(), tp=2, ep=8, pp=4, sequence_parallel=True, pipeline_layers=(9, 8, 8, 7))
    with pytest.raises(LayoutError, match="tensor parallel 16 does not divide the 8 KV groups"):
        check_layout(hunyuan_image3_config(), tp=16, sequence_parallel=True)
    staged = _tiny_config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, pipeline_layers=(2, 1))
    assert [pipeline_layer_range(staged, s) for s in range(2)] == [(0, 2), (2, 3)]


# --------------------------------------------------------------------------- four ranks


def _bad_layout_messages(folder: str, output: str) -> list[str]:
    """Bad layouts met on every rank: the CLI's and build_hunyuan_model's."""
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import LayoutError, build_hunyuan_model
    from tools.convert_hunyuan_image3 import run

    messages = []
    for extra in (["--pipeline-parallel-size", "2"], ["--tensor-parallel-size", "4"]):
        try:
            run(["import", "--hf", folder, "--output", output, "--quiet", *extra])
        except LayoutError as error:
            messages.append(str(error))
    initialize_parallel(expert_parallel_size=4)
    try:
        build_hunyuan_model(_tiny_config(num_moe_experts=6, expert_model_parallel_size=4))
    except LayoutError as error:
        messages.append(str(error))
    return messages


def _ep2_tp2_rank(ours: dict) -> dict:
    """EP=2 x TP=2 with sequence parallel: each TP pair (data-parallel rank) its own batch; the
    full logits and full gradients under full names."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    initialize_parallel(tensor_parallel_size=2, expert_parallel_size=2)
    model = build_hunyuan_model(_tiny_config(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                             sequence_parallel=True, image_path=False))
    load_full_weights(model, ours)
    dp_rank = parallel_state.get_data_parallel_rank()
    logits = model(_input_ids(50 + dp_rank, TP_SEQ))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(2)]
    dist.all_gather(parts, logits.detach().contiguous(), group=tp_group)
    full_logits = torch.cat(parts, dim=-1)
    weights = _loss_weights(full_logits.shape).chunk(2, dim=-1)[parallel_state.get_tensor_model_parallel_rank()]
    (logits * weights).sum().backward()
    return {"dp_rank": dp_rank, "logits": full_logits, "grads": _full_grads(model),
            "local_experts": len(model.layers[0].mlp.experts.local_experts)}


def _trainer_load_mismatches(checkpoint: str, full: dict) -> list[str]:
    """The trainer's loader (``training.load_dist_checkpoint``) at the layout initialised now
    (EP=2 x TP=2 + SP, the image head too): names of this rank's parameters that differ from
    their part of ``full`` (full names, global experts)."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights, shard_full_tensor
    from models.hunyuan_image3.training import load_dist_checkpoint

    model = build_hunyuan_model(_tiny_config(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                             sequence_parallel=True, cfg_distilled=True, use_meanflow=True))
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    load_dist_checkpoint(model, checkpoint)
    return [key for (key, tensor), param in zip(local_weights(model), model.parameters())
            if not torch.equal(tensor, shard_full_tensor(key, full[key], param))]


def _four_rank_checks(folder: str, root: str, ours: dict, full: dict) -> dict:
    """One world of 4 gloo ranks for everything (as under torchrun): the tool reuses it and sets
    its own layout's groups."""
    from mfmegatron.parallel import initialize_parallel
    from tools.convert_hunyuan_image3 import run

    initialize_parallel()
    messages = _bad_layout_messages(folder, f"{root}/never")
    piece_loads = {}
    for name, extra in RANK_LAYOUTS.items():
        summary = run(["import", "--hf", folder, "--output", f"{root}/{name}", "--dtype", "fp32", "--quiet", *extra])
        piece_loads[name] = (summary["pieces"], summary["piece_loads"])
    ep2_tp2 = _ep2_tp2_rank(ours)
    return {"messages": messages, "ep2_tp2": ep2_tp2, "piece_loads": piece_loads,
            "load_mismatches": _trainer_load_mismatches(f"{root}/one_process", full)}


@pytest.fixture(scope="module")
def four_ranks(released):
    """The 4-rank imports; before them, an import in this one process, which the ranks then load
    at EP=2 x TP=2 with the trainer's loader."""
    from models.hunyuan_image3.state_dict_adapter import to_megatron

    root = released["root"] / "ranks"
    root.mkdir()
    _convert("import", "--hf", str(released["folder"]), "--output", str(root / "one_process"), "--dtype", "fp32")
    full, _ = to_megatron(released["tensors"], _tiny_config(cfg_distilled=True, use_meanflow=True), image_head=True)
    results = run_on_ranks(_four_rank_checks, 4, str(released["folder"]), str(root), released["ours"], full,
                           timeout=600)
    return {"results": results, "root": root}


def test_imports_write_one_layer_at_a_time_and_load_at_another_layout(four_ranks):
    """In each 4-rank import a rank's pieces are its stage's layers (3, or 2 and 1 at PP=2 with
    stages 2, 1), and it loaded each once, or none when all it holds are replicas another rank
    writes (megatron's main replica only); at EP=2 x TP=2 every rank holds its own expert shards.
    A checkpoint written one layer at a time by one process loads with the trainer's loader at
    EP=2 x TP=2 + SP, every parameter (experts, TP shards, image head) equal to its part of the
    released weights."""
    results = four_ranks["results"]
    for layout in RANK_LAYOUTS:
        counts = [result["piece_loads"][layout] for result in results]
        assert [pieces for pieces, _ in counts] == ([2, 2, 1, 1] if layout == "pp2" else [LAYERS] * 4), counts
        assert all(loads in (0, pieces) for pieces, loads in counts), (layout, counts)
        writers = [loads for _, loads in counts if loads]
        assert sum(writers) >= LAYERS and (layout != "ep2_tp2" or len(writers) == 4), (layout, counts)
    for rank, result in enumerate(results):
        assert result["load_mismatches"] == [], (rank, result["load_mismatches"])


def test_bad_layouts_fail_on_every_rank_with_the_same_line(four_ranks):
    messages = [r["messages"] for r in four_ranks["results"]]
    assert len(messages[0]) == 3 and all(m == messages[0] for m in messages)
    cli_pp, cli_tp, build_ep = messages[0]
    assert "pipeline parallel 2 does not divide the 3 layers" in cli_pp
    assert "tensor parallel 4 does not divide the 2 KV groups" in cli_tp
    assert "expert parallel 4 does not divide the 6 experts" in build_ep
    assert not (four_ranks["root"] / "never").exists()


@pytest.mark.parametrize("layout", sorted(RANK_LAYOUTS))
def test_checkpoints_imported_at_any_layout_export_identically(released, four_ranks, layout, tmp_path):
    """Imported by 4 ranks at EP=2, TP=2 (+SP), PP=2 (stages 2, 1) or EP=2 x TP=2: the export is
    the released trunk and image head bit for bit, every expert of every layer present."""
    _convert("export", "--checkpoint", str(four_ranks["root"] / layout), "--output", str(tmp_path / "hf"),
             "--max-shard-size", "30KB")
    back = _read_hf_folder(tmp_path / "hf")
    expected = set(released["tensors"]) - set(UNCONVERTED)
    assert set(back) == expected and any(key.startswith("final_layer.") for key in back)
    assert any(key.startswith("guidance_emb.") for key in back) and any(key.startswith("timestep_r_emb.") for key in back)
    experts = {k for k in back if ".mlp.experts." in k}
    assert len(experts) == LAYERS * 8 * 2
    for key in expected:
        assert torch.equal(back[key], released["tensors"][key]), key


def test_expert_parallel_2_times_tensor_parallel_2_matches_one_rank(released, four_ranks):
    """fp32: each data-parallel rank's logits and dense gradients equal the one-rank model's on its
    batch; every expert's gradient (on the ranks of its EP rank, split over expert TP) equals the
    sum of the one-rank gradients over both batches."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    ours = released["ours"]
    expected = []
    with parallel_context():
        model = build_hunyuan_model(_tiny_config(image_path=False))
        load_full_weights(model, ours)
        for dp_rank in range(2):
            model.zero_grad(set_to_none=True)
            logits = model(_input_ids(50 + dp_rank, TP_SEQ))
            (logits * _loss_weights(logits.shape)).sum().backward()
            expected.append({"logits": logits.detach(),
                             "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
    experts_seen = set()
    for rank, result in enumerate(r["ep2_tp2"] for r in four_ranks["results"]):
        assert result["local_experts"] == 4
        want = expected[result["dp_rank"]]
        assert result["logits"].shape == (BATCH, TP_SEQ, 128)
        # fp32 sums in another order (TP reductions, EP dispatch): ~3e-5 apart on some CPUs.
        torch.testing.assert_close(result["logits"], want["logits"], rtol=1e-4, atol=1e-4)
        for name, grad in result["grads"].items():
            if ".local_experts." in name:
                target = expected[0]["grads"][name] + expected[1]["grads"][name]
                experts_seen.add(name)
            else:
                target = want["grads"][name]
            atol = 1e-5 * max(1.0, target.abs().max().item())
            torch.testing.assert_close(grad, target, rtol=1e-4, atol=atol,
                                       msg=lambda m, name=name: f"rank {rank} {name}: {m}")
    assert experts_seen == {n for n in expected[0]["grads"] if ".local_experts." in n}
