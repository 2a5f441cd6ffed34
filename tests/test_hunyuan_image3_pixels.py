"""HunyuanImage 3.0 in pixel space (``model.latent_space=pixels``): the space-to-depth encoding
and its resolution-bucket tokens, the keyed prompt dropout of flow-matching training, the
one-line errors of bad settings, and under torchrun at expert parallel 2 the shapes teacher
recipe trained a few steps by flow matching, then distilled from its checkpoint by the tiny
MeanFlow recipe."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_trainer import _env, _free_port, _kill_tree, _log

REPO = Path(__file__).resolve().parents[1]
TEACHER_RECIPE = REPO / "recipes" / "shapes_hunyuan_image3_teacher_cpu.yaml"
DISTIL_RECIPE = REPO / "recipes" / "hunyuan_image3_tiny_cpu.yaml"
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.log_interval=1"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A small shapes world (images, prompts) and the HunyuanImage tokenizer over its captions."""
    from tools.build_hunyuan_image3_tokenizer import main as build_tokenizer
    from tools.build_shapes_data import build

    root = tmp_path_factory.mktemp("shapes") / "data"
    build(root, images=64, prompts=32, size=32, seed=0, samples_per_shard=32)
    assert build_tokenizer(["--shapes-world", "--out", str(root / "hunyuan_tokenizer.json"),
                            "--image-base-size", "32"]) == 0
    return root


def _config(shapes: Path, *overrides: str):
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig

    return load_config(TrainConfig, TEACHER_RECIPE, [f"data.shards={shapes}/images",
                                                      f"data.text_tokenizer={shapes}/hunyuan_tokenizer.json",
                                                      *overrides])


def _batch(prompts: list[str]):
    from mfmegatron.data import PromptBatch

    n = len(prompts)
    return PromptBatch(keys=[str(i) for i in range(n)], prompts=prompts, meta=[None] * n, shards=[""] * n,
                       epochs=[0] * n, positions=list(range(n)))


def test_pixel_encoding_round_trips_and_the_buckets_count_the_images_pixels(shapes):
    from mfmegatron.pixels import depth_to_space
    from models.hunyuan_image3.training import HunyuanImage3Family

    family, cpu = HunyuanImage3Family(), torch.device("cpu")
    config = _config(shapes)
    assert family.latent_shape(config) == (48, 8, 8)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = family.image_encoder(config, cpu, torch.float32)(images, None)
    assert x.shape == (3, 48, 8, 8)
    assert torch.equal(depth_to_space(x, 4), images)
    assert torch.equal(family.decode_images(x, config), (images + 1) / 2)
    # A 4x4 patch's 48 values are one token's: pixel (y, x) of cell (i, j) lands in it.
    assert torch.equal(x[:, :, 1, 2].reshape(3, 3, 4, 4), images[:, :, 4:8, 8:12])

    text = family.text_conditioning(config, cpu, torch.float32)
    tokens = text.image_tokens(32, 32)
    assert tokens.size == text.id("<img_size_32>") and tokens.ratio == text.id("<img_ratio_16>")
    cond = family.condition(_batch(["a red circle", "two blue squares"]), config, cpu, torch.float32, text=text)
    assert cond.sequence.latent_hw == (8, 8)
    assert (cond.sequence.input_ids == tokens.img).sum(dim=1).tolist() == [64, 64]


def test_prompt_dropout_is_keyed_by_global_sample_and_replaces_the_prompt_by_cfg(shapes):
    from mfmegatron.training.guidance import dropped_prompts
    from models.hunyuan_image3.training import HunyuanImage3Family

    whole = dropped_prompts(0.5, 8, (0, 3, 0))
    assert torch.equal(whole, torch.cat([dropped_prompts(0.5, 4, (0, 3, 0)), dropped_prompts(0.5, 4, (0, 3, 4))]))
    assert 0 < int(whole.sum()) < 8
    assert not dropped_prompts(0.5, 8, None).any() and not dropped_prompts(0.0, 8, (0, 3, 0)).any()

    family, cpu = HunyuanImage3Family(), torch.device("cpu")
    config = _config(shapes, "model.prompt_dropout=0.5")
    text = family.text_conditioning(config, cpu, torch.float32)
    cfg = text.id("<cfg>")
    prompts = ["a red circle"] * 8
    cond = family.condition(_batch(prompts), config, cpu, torch.float32, text=text, draw=(0, 3, 0))
    # Evaluation (no draw) keeps every prompt.
    kept = family.condition(_batch(prompts), config, cpu, torch.float32, text=text)
    assert torch.equal(cond.dropped, whole) and not kept.dropped.any()
    for row, dropped in enumerate(whole.tolist()):
        start, end = cond.sequence.prompt_spans[row]
        ids = cond.sequence.input_ids[row]
        assert bool((ids[start:end] == cfg).all()) == dropped
        expected = cond.unconditional.input_ids[row] if dropped else kept.sequence.input_ids[row]
        assert torch.equal(ids, expected)
    assert family.condition_stats(cond) == {"prompt_dropped": float(whole.float().mean())}
    assert family.condition_stats(family.slice_condition(cond, slice(0, 4), 4))["prompt_dropped"] == float(
        whole[:4].float().mean())
    # Distillation keeps every prompt (its teacher's CFG makes the unconditional half itself).
    distil = _config(shapes, "train.objective=meanflow_distillation", "meanflow.z_source=teacher_ode")
    assert family.condition(_batch(prompts), distil, cpu, torch.float32, text=text, draw=(0, 3, 0)).dropped is None


def test_bad_pixel_settings_are_one_line_errors(shapes):
    from models.hunyuan_image3.training import HunyuanImage3Family

    family, cpu = HunyuanImage3Family(), torch.device("cpu")

    def error(*overrides, call=lambda f, c: f.text_conditioning(c, cpu, torch.float32)) -> str:
        with pytest.raises(ValueError) as raised:
            call(HunyuanImage3Family(), _config(shapes, *overrides))
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert "model.latent_space=pixels needs latent_channels 48 (RGB in 4x4 patches); the network has 32" in error(
        "model.overrides.latent_channels=32")
    assert "model.image_size 34x34 is not a multiple of 4 px (the pixel patch side)" in error("model.image_size=34")
    assert "model.image_size 36x36 is not one of HunyuanImage 3.0's resolution buckets" in error("model.image_size=36")
    assert "model.prompt_dropout 1.0 must be in [0, 1)" in error("model.prompt_dropout=1.0")
    vae = ("model.latent_space=vae", "model.overrides.latent_channels=32", "model.image_size=64",
           "model.image_base_size=64")
    assert "meanflow.z_source=data needs the model's VAE" in error(*vae)
    assert "train.objective=flow_matching needs HunyuanImage 3.0's VAE" in error(
        *vae, call=lambda f, c: f.build_flow_network(c, cpu))
    assert family.latent_shape(_config(shapes)) == (48, 8, 8)


def _torchrun(recipe: Path, output: Path, overrides: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    logs = output.parent / f"{output.name}.torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "mfmegatron.train", str(recipe), f"train.output_dir={output}", *QUIET,
               *overrides]
    with open(f"{logs}.out", "w") as stdout, open(f"{logs}.err", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=stdout, stderr=stderr, text=True,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        finally:
            _kill_tree(process.pid)
    return subprocess.CompletedProcess(command, returncode, Path(f"{logs}.out").read_text(),
                                       Path(f"{logs}.err").read_text())


def test_shapes_teacher_recipe_trains_at_ep2_drops_prompts_and_a_student_distils_from_it(tmp_path, shapes):
    teacher = tmp_path / "teacher"
    result = _torchrun(TEACHER_RECIPE, teacher, [
        f"data.shards={shapes}/images", f"data.text_tokenizer={shapes}/hunyuan_tokenizer.json",
        "data.micro_batch_size=8", "model.prompt_dropout=0.3", "optim.lr_warmup_steps=0", "optim.ema_decay=0.5",
        "train.steps=3", "train.save_interval=3", "train.sample_interval=3", "train.sample_steps=[2]",
        "train.eval_interval=3", f"train.eval_prompts={shapes}/heldout.txt", "train.eval_num_prompts=4",
        "train.eval_teacher_steps=[2,1]",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    log = _log(teacher)
    assert sorted(log) == [1, 2, 3]
    assert all(math.isfinite(record["flow_matching_loss"]) for record in log.values())
    assert all(record["phase"] == "flow_matching" for record in log.values())
    # 16 samples a step at 0.3: the dropout fired, and not on every sample.
    dropped = [record["prompt_dropped"] for record in log.values()]
    assert any(value > 0 for value in dropped) and all(value < 1 for value in dropped)
    checkpoint = teacher / "checkpoints" / "step_00000003"
    assert (checkpoint / "mfmegatron_hunyuan_image3.json").is_file()
    assert (teacher / "samples" / "step_00000003.png").is_file()
    # Evaluation decoded the samples to images the shapes scorer read.
    assert 0 <= log[3]["eval_teacher_1_overall"] <= 1 and (teacher / "eval" / "step_00000003.png").is_file()
    assert (teacher / "student" / "config.json").is_file()

    student = tmp_path / "student"
    result = _torchrun(DISTIL_RECIPE, student, [
        f"model.teacher_checkpoint={checkpoint}", "model.latent_space=pixels", "model.image_size=32",
        "model.image_base_size=32", f"data.shards={shapes}/prompts",
        f"data.text_tokenizer={shapes}/hunyuan_tokenizer.json", "train.steps=2", "warmup.switch_step=1",
        "meanflow.align_start_step=1", "train.save_interval=2", "train.sample_interval=2",
        "train.export_at_end=false",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    log = _log(student)
    assert sorted(log) == [1, 2]
    assert all(math.isfinite(record["loss"]) for record in log.values())
    assert "prompt_dropped" not in log[1]
    assert (student / "samples" / "step_00000002.png").is_file()
