"""Training the shapes world's teacher with the project's own trainer (flow matching on pixels),
and distilling from the trained teacher's checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

TEACHER_OVERRIDES = [
    # A smaller network than the recipe's, same structure (pixels in 2x2 patches, no guidance).
    "model.overrides.hidden_size=64",
    "model.overrides.kv_channels=16",
    "model.overrides.axes_dims_rope=[4,6,6]",
    "model.overrides.ffn_hidden_size=256",
    "data.micro_batch_size=8",
    "optim.lr_warmup_steps=0",
    "optim.ema_decay=0.5",
    "train.steps=12",
    "train.save_interval=12",
    "train.sample_interval=12",
    "train.sample_steps=[4]",
    "train.eval_interval=6",
    "train.eval_num_prompts=8",
    "train.eval_teacher_steps=[4,2]",
    "train.eval_scorer=shapes",
    "model.prompt_dropout=0.25",  # learns the empty prompt too: the distillation below guides
    "logging.log_interval=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    from tools.build_shapes_data import build

    root = tmp_path_factory.mktemp("shapes") / "data"
    build(root, images=96, prompts=64, size=32, seed=0, samples_per_shard=32)
    return root


def test_flow_matching_plan_interpolates_and_targets_noise_minus_data():
    from mfmegatron.training.flow_matching import FlowMatchingTraining

    generator = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 6, 12, generator=generator), torch.randn(4, 6, 12, generator=generator)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    plan = FlowMatchingTraining().plan(0, noise, x=x, times=(t, torch.zeros(4)))
    (training_pass,) = plan.passes
    assert training_pass.network == "flow" and training_pass.r is None
    torch.testing.assert_close(training_pass.z, (1 - t[:, None, None]) * x + t[:, None, None] * noise)
    rows = slice(0, 4)
    assert float(training_pass.loss_fn(noise - x, None, rows)[0]) == 0.0
    v = torch.randn(4, 6, 12, generator=generator)
    expected = ((v - (noise - x)) ** 2).mean()
    torch.testing.assert_close(training_pass.loss_fn(v, None, rows)[0], expected)
    with pytest.raises(ValueError, match="z_source=data"):
        FlowMatchingTraining().plan(0, noise, times=(t, t))


def _train_teacher_then_distil(data: str, output: str) -> dict:
    """One rank: flow-matching training of a pixel-space FLUX on the shapes images, then a
    distillation trainer whose teacher is that run's last checkpoint."""
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.training.trainer import Trainer
    from models.flux.vae import unpack_latents

    teacher_run = Path(output) / "teacher"
    config = load_config(TrainConfig, REPO / "recipes" / "shapes_teacher_cpu.yaml", [
        *TEACHER_OVERRIDES, f"data.shards={data}/images", f"data.text_tokenizer={data}/tokenizer.model",
        f"train.eval_prompts={data}/heldout.txt",
        f"train.output_dir={teacher_run}",
    ])  # fmt: skip
    trainer = Trainer(config)
    seen = {}
    plan = trainer.objective.plan

    def recording_plan(step, noise, cond=None, x=None, generator=None, times=None):
        seen.setdefault("x", x.clone())
        seen.setdefault("ids", trainer.text.tokenize(["a red circle above a blue square"]).input_ids)
        return plan(step, noise, cond, x, generator, times)

    trainer.objective.plan = recording_plan
    last = trainer.train()
    losses = [json.loads(line)["loss"] for line in (teacher_run / "log.jsonl").read_text().splitlines()]
    ema = {name: tensor.clone() for name, tensor in trainer.ema.shadow.items()}
    pixels = unpack_latents(seen["x"], 16, 16)

    student_run = Path(output) / "student"
    distil = load_config(TrainConfig, REPO / "recipes" / "flux_tiny_cpu.yaml", [
        f"model.teacher_checkpoint={teacher_run}/checkpoints/step_00000012", "model.latent_space=pixels",
        "model.image_size=32", "model.text_tokens=12", "data.micro_batch_size=2", "data.text_encoder=dummy",
        f"data.text_tokenizer={data}/tokenizer.model", f"data.shards={data}/prompts",
        "parallel.tensor_parallel_size=1", "alignment.enabled=false", "meanflow.align_weight=0",
        "optim.ema_decay=0.5", "train.steps=2", f"train.output_dir={student_run}", "train.export_at_end=false",
        "train.eval_interval=1", f"train.eval_prompts={data}/heldout.txt", "train.eval_num_prompts=4",
        "train.eval_student_steps=[1,2]", "train.eval_teacher_steps=[4,2]", "train.eval_scorer=shapes",
        "train.sample_interval=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "model.guidance_range=[2.0,6.0]",  # a CFG teacher against the empty prompt
    ])  # fmt: skip
    student_trainer = Trainer(distil)
    guided = student_trainer.teacher.classifier_free_guidance
    teacher = dict(student_trainer.teacher.named_parameters())
    same = all(torch.equal(teacher[name].detach(), ema[name]) for name in ema)
    student_trainer.train()
    # The student learns w through its own guidance embedding (zero at first): it moved.
    guidance_out = [p for n, p in student_trainer.student.named_parameters() if "guidance_in.mlp.linear_2.weight" in n]
    guidance_learned = len(guidance_out) == 1 and float(guidance_out[0].abs().sum()) > 0
    distil_log = [json.loads(line) for line in (student_run / "log.jsonl").read_text().splitlines()]

    # The evaluation samples the EMA student, not the live one.
    from mfmegatron.sampling import sample_student
    from mfmegatron.metrics import sample_distance

    evaluator = student_trainer.evaluator
    reference = evaluator._teacher_samples()["teacher_4"]
    distances = {}
    for which, context in (("ema", student_trainer.ema.applied()), ("live", contextlib.nullcontext())):
        with context:
            latents = sample_student(student_trainer.student_runner, evaluator.noise, evaluator.cond, 1)
        distances[which] = sample_distance(evaluator._decode(latents), reference)["paired_rmse"]
    return {
        "losses": losses, "last": last, "pixels": pixels, "ids": seen["ids"], "teacher_is_the_ema": same,
        "num_ema": len(ema), "distil_log": distil_log, "distances": distances, "guided": guided,
        "guidance_learned": guidance_learned,
        "teacher_log": [json.loads(line) for line in (teacher_run / "log.jsonl").read_text().splitlines()],
        "files": sorted(str(p.relative_to(output)) for p in Path(output).rglob("*") if p.is_file()),
    }


def test_the_trainer_trains_a_pixel_teacher_by_flow_matching_and_distils_from_it(shapes_data, tmp_path):
    from mfmegatron.parallel import run_on_ranks

    result = run_on_ranks(_train_teacher_then_distil, 1, str(shapes_data), str(tmp_path))[0]
    # The data are the images themselves in [-1, 1]: black background at -1, colours at +-1.
    pixels = result["pixels"]
    assert pixels.shape[1:] == (3, 32, 32)
    assert float((pixels == -1).float().mean()) > 0.5 and float(pixels.max()) == 1.0
    # The shapes tokenizer, not hashed words: 7 word ids and EOS (1), then padding (0).
    ids = result["ids"][0].tolist()
    assert ids[7] == 1 and ids[8:] == [0] * 4 and 2 not in ids[:7]
    losses = result["losses"]
    assert len(losses) == 12 and result["last"]["phase"] == "flow_matching"
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    files = result["files"]
    assert "teacher/samples/step_00000012.png" in files and "teacher/student/config.json" in files
    # Flow-matching runs evaluate their own EMA as the teacher, at the teacher step counts.
    evaluated = {r["step"]: r for r in result["teacher_log"] if "eval_teacher_2_overall" in r}
    assert sorted(evaluated) == [6, 12] and "teacher/eval/step_00000012.png" in files
    # Prompt dropout engaged: some steps trained some samples on the empty prompt, not all.
    dropped = [r["prompt_dropped"] for r in result["teacher_log"] if "prompt_dropped" in r]
    assert len(dropped) == 12 and 0 < sum(dropped) / 12 < 0.6 and max(dropped) < 1
    assert 0.0 <= evaluated[12]["eval_teacher_2_overall"] <= 1.0 and evaluated[12]["eval_teacher_2_mmd"] >= 0
    # The distillation trainer's teacher is the flow-matching run's EMA, every tensor of it, run
    # with classifier-free guidance.
    assert result["num_ema"] > 20 and result["teacher_is_the_ema"] and result["guided"] and result["guidance_learned"]
    log = {r["step"]: r for r in result["distil_log"]}
    for step in (1, 2):
        for sampler in ("student_1", "student_2", "teacher_2"):
            assert math.isfinite(log[step][f"eval_{sampler}_paired_rmse"]), (step, sampler)
            assert log[step][f"eval_{sampler}_num_prompts"] == 4
        assert "eval_teacher_4_paired_rmse" not in log[step]  # the reference itself
    assert "student/eval/step_00000002.png" in files
    distances = result["distances"]
    assert log[2]["eval_student_1_paired_rmse"] == distances["ema"] != distances["live"]


def test_the_score_table_lists_every_sampler():
    from mfmegatron.training.evaluation import format_score_table

    stats = {"eval_teacher_2_overall": 0.5, "eval_teacher_2_paired_rmse": 0.1, "eval_student_1_overall": 0.25,
             "eval_student_4_overall": 0.75, "eval_teacher_50_overall": 1.0}
    table = format_score_table(stats, scorer=True).splitlines()
    assert [line.split()[0] + line.split()[1] for line in table[2:]] == [
        "teacher50", "teacher2", "student4", "student1"]
    assert table[3].split()[3] == "0.500" and table[3].split()[-2] == "0.100"


def test_the_dummy_encoder_settings_reach_the_teachers_text_encoder(shapes_data):
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig
    from models.flux.training import FluxFamily

    def text(*overrides):
        config = load_config(TrainConfig, REPO / "recipes" / "shapes_teacher_cpu.yaml",
                             [f"data.text_tokenizer={shapes_data / 'tokenizer.model'}", *overrides])  # fmt: skip
        return FluxFamily().text_conditioning(config, torch.device("cpu"), torch.float32)

    default, strong = text(), text("data.text_position_scale=1.0")
    assert default.position_scale == 0.1 and strong.position_scale == 1.0
    # The recipe's words through its tokenizer: only the position rows differ, tenfold.
    prompts = ["a red circle above a blue square"]
    a, b = default.encode(prompts).t5, strong.encode(prompts).t5
    bag = text("data.text_position_scale=0").encode(prompts).t5
    assert torch.allclose(b - bag, 10 * (a - bag), atol=1e-5) and (a - bag).abs().min() > 0
    with_context = text("data.text_context_scale=0.5")
    assert default.context_scale == 0.0 and with_context.context_scale == 0.5
    assert not torch.allclose(with_context.encode(prompts).t5, a)
