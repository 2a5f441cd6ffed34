"""The trainer distilling HunyuanImage 3.0 (``models/hunyuan_image3/training.py``): the tiny
recipe at expert parallel 2 under torchrun (2 gloo ranks) end to end, its resume after SIGKILL
and at other layouts, its Hugging Face export against the checkpoint's EMA and the few-step
sampler, the CFG teacher through the runner (also across pipeline stages), and the one-line
errors of bad inputs. Everything is built here: a word-level tokenizer.json over the test prompts
with HunyuanImage 3.0's special tokens, prompt shards and a random tiny teacher checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_trainer import (_assert_same_checkpoints, _check, _checkpoint_tensors, _env, _free_port, _kill_tree,
                                _latest, _log, _resume_from)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "hunyuan_image3_tiny_cpu.yaml"
PROMPTS = [f"a {colour} {kind} in {place}" for colour in ("red", "green", "blue", "white")
           for kind in ("cat", "boat", "tree", "lamp") for place in ("rain", "snow", "fog", "town", "space", "night")]
BASE_SIZE = 64
# The tiny recipe, shortened: warm-up switch after step 2, alignment from step 4.
SCHEDULE = ["train.steps=8", "train.save_interval=4", "train.sample_interval=4", "warmup.switch_step=2",
            "meanflow.align_start_step=4", "logging.progress_bar=false", "logging.tensorboard=false"]


def _recipe_config(*overrides: str):
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig

    return load_config(TrainConfig, RECIPE, list(overrides))


def _save_teacher(directory: str) -> None:
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, save_dist_checkpoint
    from models.hunyuan_image3.state_dict_adapter import hf_config_from_config
    from models.hunyuan_image3.training import HunyuanImage3Family

    initialize_parallel(seed=5)
    model = build_hunyuan_model(HunyuanImage3Family().model_config(_recipe_config("parallel.expert_parallel_size=1"),
                                                                   student=False))
    save_dist_checkpoint(model, directory, hf_config_from_config(model.config))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Prompt shards, the tokenizer.json and a random tiny teacher checkpoint (the same teacher at
    every layout)."""
    from mfmegatron.data import build_prompt_shards
    from mfmegatron.parallel import run_on_ranks
    from models.hunyuan_image3.tokenizer import write_word_level_tokenizer

    root = tmp_path_factory.mktemp("hunyuan")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    build_prompt_shards([root / "prompts.txt"], root / "shards", samples_per_shard=12)
    write_word_level_tokenizer(PROMPTS, root / "tokenizer.json", BASE_SIZE)
    (root / "teacher").mkdir()
    run_on_ranks(_save_teacher, 1, str(root / "teacher"))
    return {"shards": root / "shards", "tokenizer": root / "tokenizer.json", "teacher": root / "teacher"}


def _command(nproc: int, output: Path, data: dict, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(_free_port()), "-m", "mfmegatron.train", str(RECIPE), *SCHEDULE,
        f"data.shards={data['shards']}", f"data.text_tokenizer={data['tokenizer']}",
        f"model.teacher_checkpoint={data['teacher']}", f"train.output_dir={output}", *extra,
    ]


def _run(nproc: int, output: Path, data: dict, extra: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    output.mkdir(parents=True, exist_ok=True)
    logs = output.parent / f"{output.name}.torchrun"
    with open(f"{logs}.out", "w") as stdout, open(f"{logs}.err", "w") as stderr:
        process = subprocess.Popen(_command(nproc, output, data, extra), cwd=REPO, env=_env(), stdout=stdout,
                                   stderr=stderr, text=True, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        finally:
            _kill_tree(process.pid)
    return subprocess.CompletedProcess(process.args, returncode, Path(f"{logs}.out").read_text(),
                                       Path(f"{logs}.err").read_text())


# -- in a world of one ------------------------------------------------------------------------


def _export_matches_the_checkpoint(folder: str, checkpoint: str, tokenizer: str, teacher: str) -> dict:
    """The exported folder's weights against the checkpoint's EMA (bit for bit), and the few-step
    sampler on both (float tolerance)."""
    from mfmegatron.data import PromptBatch
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights
    from models.hunyuan_image3.sampling import load_exported_student, sample_student
    from models.hunyuan_image3.training import HunyuanImage3Family, load_dist_checkpoint

    initialize_parallel()
    family = HunyuanImage3Family()
    config = _recipe_config("parallel.expert_parallel_size=1", f"data.text_tokenizer={tokenizer}",
                            f"model.teacher_checkpoint={teacher}")
    ema = build_hunyuan_model(family.model_config(config, student=True))
    load_dist_checkpoint(ema, checkpoint)  # a training checkpoint: its EMA
    exported = load_exported_student(folder, torch.float32)
    ours, theirs = dict(local_weights(ema)), dict(local_weights(exported))
    assert ours.keys() == theirs.keys()
    mismatched = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    prompts = PROMPTS[:3]
    batch = PromptBatch(keys=["a", "b", "c"], prompts=prompts, meta=[None] * 3, shards=[""] * 3, epochs=[0] * 3,
                        positions=[0, 1, 2])
    cond = family.condition(batch, config, torch.device("cpu"), torch.float32,
                            text=family.text_conditioning(config, torch.device("cpu"), torch.float32), draw=(1, 2, 3))
    noise = torch.randn((3, *family.latent_shape(config)), generator=torch.Generator().manual_seed(0))
    samples = [sample_student(model, cond.student_sequence, noise, 2, cond.guidance) for model in (ema.eval(), exported)]
    return {"keys": len(ours), "mismatched": mismatched, "sample_difference": float((samples[0] - samples[1]).abs().max()),
            "sample_scale": float(samples[0].abs().max())}


def test_tiny_recipe_at_ep2_switches_aligns_resumes_after_sigkill_and_exports(tmp_path, data):
    reference = tmp_path / "reference"
    result = _run(2, reference, data, [])
    _check(result)
    assert "ep=2" in result.stdout
    log = _log(reference)
    phases = [log[step]["phase"] for step in sorted(log)]
    assert phases[:2] == ["discrete"] * 2 and set(phases[2:]) == {"differential"}, phases
    assert any(record["time_r_below_t_fraction"] > 0 for record in log.values())
    aligned = [step for step, record in log.items() if "align_loss" in record]
    assert aligned == [5, 6, 7, 8] and all("fake_loss" in log[step] for step in aligned)
    assert (reference / "samples" / "step_00000004.png").is_file()

    # SIGKILL every rank after step 5 (last checkpoint: 4), resume: the uninterrupted result.
    run = tmp_path / "interrupted"
    run.mkdir()
    process = subprocess.Popen(_command(2, run, data, []), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if (run / "log.jsonl").exists() and max(_log(run), default=0) >= 5:
            break
        time.sleep(0.02)
    _kill_tree(process.pid)
    process.wait()
    assert 5 <= max(_log(run)) < 8 and _latest(run) == "step_00000004"
    resumed = _run(2, run, data, [])
    _check(resumed)
    assert "at step 4" in resumed.stdout
    name = "checkpoints/step_00000008"
    expected, got, teacher = _checkpoint_tensors(reference / name, run / name, data["teacher"])
    assert expected.keys() == got.keys()
    for prefix in ("student.", "ema.", "fake."):
        assert any(key.startswith(prefix) for key in got), prefix
    # Adam's state of both networks (megatron chains the dense and the expert parameters' optimizers).
    for network in ("student", "fake"):
        assert any(key.startswith("chained_1.") and f"exp_avg.{network}.layers." in key for key in got), network
    # Every expert of every layer is in the checkpoint (each EP rank wrote its four), and every
    # one of them trained away from the teacher: each EP rank's experts received tokens.
    for layer in (0, 1):
        key = f"layers.{layer}.mlp.experts.experts.linear_fc2.weight"
        assert got[f"student.{key}"].shape[0] == 8
        assert all(not torch.equal(got[f"student.{key}"][e], teacher[key][e]) for e in range(8)), layer
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert _log(run)[8]["loss"] == log[8]["loss"]

    # The export (rank 0's conversion of the EMA) equals the checkpoint's EMA; the few-step
    # sampler gives the same latents from the folder as from the EMA loaded from the checkpoint.
    from mfmegatron.parallel import run_on_ranks

    (checks,) = run_on_ranks(_export_matches_the_checkpoint, 1, str(reference / "student"), str(reference / name),
                             str(data["tokenizer"]), str(data["teacher"]))
    assert checks["keys"] > 50 and checks["mismatched"] == []
    assert checks["sample_difference"] <= 1e-5 * checks["sample_scale"], checks
    config = json.loads((reference / "student" / "config.json").read_text())
    assert config["cfg_distilled"] and config["use_meanflow"]

    # Expert parallel 2 -> 1 (still 2 data-parallel ranks: the same samples): the next steps'
    # losses from the step-4 checkpoint equal the EP=2 run's.
    other = _resume_from(reference, tmp_path / "ep1", 4)
    result = _run(2, other, data, ["parallel.expert_parallel_size=1", "train.steps=6"])
    _check(result)
    assert "ep=1" in result.stdout and "at step 4" in result.stdout
    for step in (5, 6):
        for key in ("loss", "align_loss", "fake_loss"):
            assert _log(other)[step][key] == pytest.approx(log[step][key], rel=1e-4), (step, key)


@pytest.mark.parametrize(
    "layout,resumed_layout",
    [
        (["parallel.expert_parallel_size=1", "parallel.pipeline_parallel_size=2", "parallel.num_microbatches=2",
          "alignment.fake_network=lora", "alignment.lora_rank=4"],
         ["parallel.expert_parallel_size=1", "parallel.num_microbatches=2", "alignment.fake_network=lora",
          "alignment.lora_rank=4"]),
        (["parallel.expert_parallel_size=1", "parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"],
         ["parallel.expert_parallel_size=1"]),
        (["parallel.expert_parallel_size=1", "parallel.tensor_parallel_size=2", "parallel.sequence_parallel=false"],
         ["parallel.expert_parallel_size=1"]),
    ],
    ids=["pp2_to_pp1_lora_fake", "tp2_sp_to_tp1", "tp2_no_sp_to_tp1"],
)
def test_resume_at_another_layout_continues_with_the_same_loss(tmp_path, data, layout, resumed_layout):
    # 2 ranks in one model-parallel group, then one process (data-parallel size 1 both times).
    schedule = ["train.steps=6", "train.sample_interval=0", "train.export_at_end=false",
                "meanflow.time_sampling.equal_fraction=0.25"]
    first = tmp_path / "first"
    _check(_run(2, first, data, [*schedule, *layout]))
    second = _resume_from(first, tmp_path / "second", 4)
    result = _run(1, second, data, [*schedule, *resumed_layout])
    _check(result)
    assert "at step 4" in result.stdout
    for step in (5, 6):
        expected, got = _log(first)[step], _log(second)[step]
        assert got["phase"] == expected["phase"] == "differential"
        assert got["time_r_below_t_fraction"] == expected["time_r_below_t_fraction"]
        for key in ("loss", "align_loss", "fake_loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4), (step, key)
    if "alignment.fake_network=lora" in layout:
        (saved,) = _checkpoint_tensors(first / "checkpoints" / "step_00000004")
        fake = [key for key in saved if key.startswith("fake.")]
        assert fake and all(".self_attention." in key and ".lora." in key for key in fake), fake[:4]


def test_bf16_with_the_distributed_optimizer_resumes_bit_identically_and_exports_the_released_dtypes(tmp_path, data):
    # The GPU recipes' precision: bf16 networks, fp32 main parameters sharded by megatron's
    # distributed optimizer (dense and expert buffers). The frozen teacher keeps the released
    # float32 router weight; the trainable student stores it in bf16 (megatron's optimizers pair
    # parameters of one dtype: a float32 one among them broke the first save).
    # It also runs the Instruct models' text template (role text around the prompt, 8 of the 16
    # text tokens), which the export records.
    extra = ["model.dtype=bf16", "parallel.use_distributed_optimizer=true", "train.steps=6",
             "train.save_interval=3", "train.sample_interval=0", "model.sequence_template=instruct",
             "model.text_tokens=16"]
    reference = tmp_path / "reference"
    _check(_run(2, reference, data, extra))
    resumed = _resume_from(reference, tmp_path / "resumed", 3)
    result = _run(2, resumed, data, [*extra, "train.export_at_end=false"])
    _check(result)
    assert "at step 3" in result.stdout
    got = _assert_same_checkpoints(reference, resumed, 6)
    assert got["student.layers.0.mlp.router.weight"].dtype == torch.bfloat16
    assert any(".exp_avg." in key and "experts" in key for key in got)  # the experts' Adam state
    assert _log(resumed)[6]["loss"] == _log(reference)[6]["loss"]

    from safetensors import safe_open

    with safe_open(str(reference / "student" / "model.safetensors"), "pt") as exported:
        dtypes = {key: str(exported.get_slice(key).get_dtype()) for key in exported.keys()}
    assert dtypes["model.layers.0.mlp.gate.wg.weight"] == "F32"
    assert dtypes["model.layers.0.mlp.experts.0.down_proj.weight"] == "BF16"
    exported_config = json.loads((reference / "student" / "config.json").read_text())
    assert exported_config["mfmegatron_sequence_template"] == "instruct"


# -- the CFG teacher through the family ---------------------------------------------------------


def _teacher_inputs(family, config):
    """Four prompts of different lengths, their latents, times and conditioning (guidance drawn)."""
    from mfmegatron.data import PromptBatch

    prompts = [PROMPTS[0], "a cat", PROMPTS[5], "a blue lamp in fog"]
    batch = PromptBatch(keys=list("abcd"), prompts=prompts, meta=[None] * 4, shards=[""] * 4, epochs=[0] * 4,
                        positions=[0, 1, 2, 3])
    generator = torch.Generator().manual_seed(3)
    z = torch.randn((4, *family.latent_shape(config)), generator=generator)
    t = torch.tensor([0.9, 0.5, 0.3, 0.7])
    text = family.text_conditioning(config, torch.device("cpu"), torch.float32)
    cond = family.condition(batch, config, torch.device("cpu"), torch.float32, text=text, draw=(1, 0, 0))
    return z, t, cond


def _cfg_reference(checkpoint: str, tokenizer: str):
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.runner import NetworkRunner
    from models.hunyuan_image3.parallelize import build_hunyuan_model
    from models.hunyuan_image3.training import HunyuanImage3Family, load_dist_checkpoint

    initialize_parallel()
    family = HunyuanImage3Family()
    config = _recipe_config("parallel.expert_parallel_size=1", f"data.text_tokenizer={tokenizer}",
                            f"model.teacher_checkpoint={checkpoint}", "model.guidance_range=[2.0,8.0]")
    z, t, cond = _teacher_inputs(family, config)
    networks = family.build_networks(config, torch.device("cpu"), with_fake=False)
    runner = NetworkRunner(family, networks.teacher.eval(), num_microbatches=2)
    with torch.no_grad():
        plain = build_hunyuan_model(family.model_config(config, student=False))
        load_dist_checkpoint(plain, checkpoint)
        v_cond = plain.velocity(cond.sequence, z, t)
        v_uncond = plain.velocity(cond.unconditional, z, t)
    w = cond.guidance.view(-1, 1, 1, 1)
    return {"runner": runner.velocity(z, t, cond), "two_calls": v_uncond + w * (v_cond - v_uncond),
            "v_cond": v_cond, "guidance": cond.guidance,
            "unconditional_ids": cond.unconditional.input_ids, "ids": cond.sequence.input_ids}


def _pipelined_teacher(checkpoint: str, tokenizer: str):
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.runner import NetworkRunner
    from models.hunyuan_image3.training import HunyuanImage3Family

    initialize_parallel(pipeline_parallel_size=2)
    family = HunyuanImage3Family()
    config = _recipe_config("parallel.expert_parallel_size=1", "parallel.pipeline_parallel_size=2",
                            "parallel.num_microbatches=2", f"data.text_tokenizer={tokenizer}",
                            f"model.teacher_checkpoint={checkpoint}", "model.guidance_range=[2.0,8.0]")
    z, t, cond = _teacher_inputs(family, config)
    networks = family.build_networks(config, torch.device("cpu"), with_fake=False)
    runner = NetworkRunner(family, networks.teacher.eval(), num_microbatches=2, no_grad_rows=2)
    # As numbers: a tensor that a rank's collectives filled does not survive the rank's exit.
    return runner.velocity(z, t, cond).numpy().copy()


def test_the_cfg_teacher_through_the_runner_is_uncond_plus_w_times_the_difference(data):
    from mfmegatron.parallel import run_on_ranks

    (reference,) = run_on_ranks(_cfg_reference, 1, str(data["teacher"]), str(data["tokenizer"]))
    # Per-sample scales in [2, 8], different per sample; the unconditional rows are the prompt's
    # rows with <cfg> in place of every prompt token (same length).
    w = reference["guidance"]
    assert ((w >= 2) & (w <= 8)).all() and len(set(w.tolist())) == 4
    assert reference["unconditional_ids"].shape == reference["ids"].shape
    assert not torch.equal(reference["unconditional_ids"], reference["ids"])
    scale = reference["two_calls"].abs().max()
    torch.testing.assert_close(reference["runner"], reference["two_calls"], rtol=0, atol=1e-5 * scale)
    assert (reference["runner"] - reference["v_cond"]).abs().max() > 1e-3 * scale  # guidance did something
    # Across two pipeline stages (the [cond; uncond] activation travels as [2s, b, h]): the same.
    for through_pipeline in run_on_ranks(_pipelined_teacher, 2, str(data["teacher"]), str(data["tokenizer"])):
        torch.testing.assert_close(torch.from_numpy(through_pipeline), reference["two_calls"], rtol=0, atol=1e-5 * scale)


def test_the_guidance_scale_of_a_global_sample_does_not_depend_on_the_data_parallel_size():
    from mfmegatron.training.guidance import guidance_scales

    whole = guidance_scales(3.0, 7.0, 4, (11, 5, 0))
    halves = torch.cat([guidance_scales(3.0, 7.0, 2, (11, 5, 0)), guidance_scales(3.0, 7.0, 2, (11, 5, 2))])
    assert torch.equal(whole, halves) and ((whole >= 3) & (whole <= 7)).all()
    assert not torch.equal(whole, guidance_scales(3.0, 7.0, 4, (11, 6, 0)))
    assert torch.equal(guidance_scales(3.0, 7.0, 3, None), torch.full((3,), 5.0))


# -- bad inputs -----------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(tmp_path, data):
    from mfmegatron.data import PromptBatch
    from models.hunyuan_image3.tokenizer import resolution_buckets, write_word_level_tokenizer
    from models.hunyuan_image3.training import HunyuanImage3Family

    family = HunyuanImage3Family()
    cpu = torch.device("cpu")

    def config(*overrides):
        return _recipe_config(f"data.text_tokenizer={data['tokenizer']}", *overrides)

    def one_line(error) -> str:
        text = str(error.value)
        assert "\n" not in text
        return text

    # The official buckets: 33 around 1024, the square in the middle (ratio index 16).
    buckets = resolution_buckets(1024)
    assert len(buckets) == 33 and buckets[16] == (1024, 1024) and buckets[0] == (512, 2048)
    with pytest.raises(ValueError) as error:
        family.text_conditioning(config("model.image_size=48"), cpu, torch.float32)
    assert "model.image_size 48x48 is not one of HunyuanImage 3.0's resolution buckets" in one_line(error)
    with pytest.raises(ValueError) as error:
        family.text_conditioning(config("model.image_size=72"), cpu, torch.float32)
    assert "not a multiple of 16" in one_line(error)

    plain = tmp_path / "plain.json"
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "cat": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(plain))
    with pytest.raises(ValueError) as error:
        family.text_conditioning(config(f"data.text_tokenizer={plain}"), cpu, torch.float32)
    assert "lacks HunyuanImage 3.0's special tokens <|startoftext|>, <boi>" in one_line(error)

    long_prompt = "a red cat in rain " * 4
    batch = PromptBatch(keys=["k"], prompts=[long_prompt], meta=[None], shards=[""], epochs=[0], positions=[0])
    recipe = config()
    text = family.text_conditioning(recipe, cpu, torch.float32)
    with pytest.raises(ValueError) as error:
        family.condition(batch, recipe, cpu, torch.float32, text=text)
    assert "is 20 tokens; model.text_tokens allows 12" in one_line(error)

    big = tmp_path / "big.json"
    write_word_level_tokenizer([f"word{i}" for i in range(200)], big, BASE_SIZE)
    with pytest.raises(ValueError) as error:
        family.text_conditioning(config(f"data.text_tokenizer={big}"), cpu, torch.float32)
    assert "more than the model's vocabulary of 128" in one_line(error)

    # From mfmegatron-train: the same line, before any network is built.
    result = subprocess.run(
        [sys.executable, "-m", "mfmegatron.train", str(RECIPE), "parallel.expert_parallel_size=1",
         f"data.shards={data['shards']}", f"data.text_tokenizer={plain}", f"train.output_dir={tmp_path / 'run'}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "lacks HunyuanImage 3.0's special tokens" in result.stderr
    assert "Traceback" not in result.stderr


def _embedding_student_at_init(checkpoint: str, tokenizer: str):
    """The family's student with ``student_conditioning=embedding``, built and initialised as the
    trainer does, through the runner: its average velocity at init and the conditional teacher's
    velocity (two plain calls' first)."""
    from mfmegatron.data import PromptBatch
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.runner import NetworkRunner
    from models.hunyuan_image3.training import HunyuanImage3Family

    initialize_parallel()
    family = HunyuanImage3Family()
    config = _recipe_config("parallel.expert_parallel_size=1", f"data.text_tokenizer={tokenizer}",
                            f"model.teacher_checkpoint={checkpoint}", "model.student_conditioning=embedding")
    batch = PromptBatch(keys=["a", "b"], prompts=PROMPTS[:2], meta=[None] * 2, shards=[""] * 2, epochs=[0] * 2,
                        positions=[0, 1])
    text = family.text_conditioning(config, torch.device("cpu"), torch.float32)
    cond = family.condition(batch, config, torch.device("cpu"), torch.float32, text=text, draw=(1, 0, 0))
    networks = family.build_networks(config, torch.device("cpu"), with_fake=False)
    z = torch.randn((2, *family.latent_shape(config)), generator=torch.Generator().manual_seed(1))
    t, r = torch.tensor([0.8, 0.6]), torch.tensor([0.3, 0.6])
    student = NetworkRunner(family, networks.student.eval(), num_microbatches=1).mean_velocity(z, r, t, cond)
    with torch.no_grad():
        conditional = networks.teacher.velocity(cond.sequence, z, t)
    same = (torch.equal(cond.student_sequence.input_ids, cond.sequence.input_ids)
            and cond.student_sequence.guidance_positions is None)
    return {"student": student, "conditional": conditional, "same_sequence": same}


def test_an_embedding_student_starts_as_the_conditional_teacher(data):
    from mfmegatron.parallel import run_on_ranks

    (result,) = run_on_ranks(_embedding_student_at_init, 1, str(data["teacher"]), str(data["tokenizer"]))
    assert result["same_sequence"]  # no <guidance> / <timestep_r> tokens
    torch.testing.assert_close(result["student"], result["conditional"], rtol=0, atol=0)
