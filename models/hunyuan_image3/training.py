"""HunyuanImage 3.0 as a model family of the trainer (``mfmegatron.training.family.ModelFamily``).

- Teacher: the conditional architecture, frozen, run with classifier-free guidance. Its stage
  forward builds the official CFG batch, [cond; uncond] (the prompt's sequence and its copy with
  every prompt token replaced by ``<cfg>``, latents and σ repeated), in one call, and the last
  stage returns ``uncond + w·(cond − uncond)`` with each sample's w. Under pipeline parallelism the
  stage activation ``[s, 2b, h]`` travels as ``[2s, b, h]`` (the unconditional half after the
  conditional one on the sequence dim, as tangent rows travel), so megatron's schedules see the
  micro-batch size they were given.
- Student: ``use_meanflow`` (``timestep_r_emb``, fed σ_r) and ``cfg_distilled`` (``guidance_emb``,
  fed w), ``model.student_conditioning`` saying where those enter; initialised from the teacher
  (``meanflow.init_student_from_teacher``). It sees the same w as the teacher, per sample.
- Fake network (alignment): the teacher's architecture evaluated *without* CFG. It plays DMD's
  fake score: it is trained by conditional flow matching on the student's samples, so its
  conditional velocity is already its estimate for the student's (guided) distribution; guiding
  it again would push that estimate away from the samples it was fitted to. A full copy of the
  teacher, or LoRA on the teacher's own weights over the attention projections (QKV and output)
  of every layer — not the MoE: routed experts are split over the expert-parallel group, which
  ``jvp/lora.py``'s tensor-parallel reductions do not cover, and the shared expert's SwiGLU input
  projection holds its gate and up halves per TP rank, which a LoRA factor split along it would
  store layout-dependently.
- Text: prompts are tokenised with the model's ``tokenizer.json`` (``data.text_tokenizer``) into
  the official template (``sequence.build_image_sequences``; ``model.sequence_template``: the base
  model's ``pretrain`` or the Instruct models' ``instruct`` with its role text), every sequence
  padded to one length fixed by the recipe (``model.text_tokens`` for the prompt and the
  template's text), so pipeline stages exchange one shape. The guidance scale is drawn per sample, uniform in ``model.guidance_range``, from a
  generator keyed by (seed, step, global sample index).
- No VAE in the project: with ``model.latent_space=vae`` (the released model's latents)
  ``meanflow.z_source=data`` is refused, evaluation compares latents, and sample grids show latent
  channels.
- ``model.latent_space=pixels`` (a teacher trained from scratch on a small world, e.g. the shapes
  world): the latent grid is the RGB image in [-1, 1] folded space-to-depth by ``PIXEL_PATCH``
  (32x32x3 -> 8x8x48: 64 image tokens), so ``latent_channels`` must be 3·PIXEL_PATCH². The
  resolution buckets then count the image's own pixels: ``model.image_base_size`` is a size of
  the pixel images (32 for the shapes world) and ``image_size`` must be a bucket around it and a
  multiple of PIXEL_PATCH, so ``<img_size_*>`` / ``<img_ratio_*>`` describe the real image.
  ``meanflow.z_source=data`` reads the images, evaluation and sample grids show them, and
  ``train.objective=flow_matching`` trains the teacher architecture, dropping the prompt of
  ``model.prompt_dropout`` of the samples (``<cfg>`` for every prompt token, the unconditional
  sequence of the CFG teacher), keyed like the guidance scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from mfmegatron.pixels import depth_to_space, space_to_depth, to_unit_range
from mfmegatron.training.guidance import (
    check_guidance_settings,
    combine_guidance,
    dropped_prompts,
    from_transport,
    guidance_scales,
    is_guided,
    to_transport,
)
from models.hunyuan_image3.config import HUNYUAN_IMAGE3_CONFIGS, HunyuanImage3Config
from models.hunyuan_image3.memory import sequence_length
from models.hunyuan_image3.sequence import (
    ImageSequence,
    build_image_sequences,
    cfg_batch,
    unconditional_sequences,
)
from models.hunyuan_image3.tokenizer import PIXEL_PATCH, PromptTokenizer, check_image_size, pixels_per_cell

# <bos>, then <boi> <img_size> <img_ratio> <timestep> before the image and <eoi> after it (the
# instruct template's role text counts in model.text_tokens).


@dataclass
class HunyuanCondition:
    """A batch's conditioning. ``sequence``: the prompts in the teacher's layout; ``unconditional``:
    its CFG copy (prompt tokens -> ``<cfg>``); ``student_sequence``: the student's layout (the
    teacher's, or with ``<guidance>`` / ``<timestep_r>``); ``guidance``: per-sample CFG scale w [b]
    (float32)."""

    sequence: ImageSequence
    unconditional: ImageSequence
    student_sequence: ImageSequence
    guidance: torch.Tensor
    # [b] bool: the samples whose ``sequence`` is the unconditional one (flow-matching training's
    # prompt dropout); None: none dropped.
    dropped: torch.Tensor | None = None


def select_sequence_rows(sequence: ImageSequence, rows) -> ImageSequence:
    """Batch rows of a sequence (a slice, or a tensor of row indices)."""
    count = sequence.input_ids.shape[0]
    indices = list(range(count))[rows] if isinstance(rows, slice) else [int(i) for i in rows.tolist()]

    def pick(values):
        return None if values is None else [values[i] for i in indices]

    index = torch.tensor(indices, dtype=torch.long, device=sequence.input_ids.device)
    return dataclasses.replace(
        sequence, input_ids=sequence.input_ids[index], positions_y=sequence.positions_y[index],
        positions_x=sequence.positions_x[index], image_spans=pick(sequence.image_spans),
        timestep_positions=pick(sequence.timestep_positions), lengths=pick(sequence.lengths),
        prompt_spans=pick(sequence.prompt_spans), guidance_positions=pick(sequence.guidance_positions),
        timestep_r_positions=pick(sequence.timestep_r_positions),
    )


# The official CFG scale (the released generation_config.json): the teacher's w when
# model.guidance_range is unset.
OFFICIAL_GUIDANCE_RANGE = (5.0, 5.0)


def guidance_range(config) -> tuple[float, float]:
    """The teacher's CFG scale range: ``model.guidance_range``, or the official scale."""
    return tuple(config.model.guidance_range or OFFICIAL_GUIDANCE_RANGE)


def drop_prompts(sequence: ImageSequence, unconditional: ImageSequence, dropped: torch.Tensor) -> ImageSequence:
    """``sequence`` with the ``dropped`` rows taken from ``unconditional`` (same layout)."""
    mask = dropped.to(sequence.input_ids.device).unsqueeze(1)
    return dataclasses.replace(sequence, input_ids=torch.where(mask, unconditional.input_ids, sequence.input_ids))


def load_dist_checkpoint(model, directory) -> None:
    """Fills ``model`` (any layout) from a dist checkpoint: an imported one, or a training
    checkpoint, whose weights are under the first of its ``weight_prefixes`` (the EMA's)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    from models.hunyuan_image3.parallelize import read_checkpoint_info

    prefix = (read_checkpoint_info(directory).get("weight_prefixes") or [""])[0]
    sharded = model.sharded_state_dict()
    if prefix:  # a training checkpoint's EMA holds parameters only
        parameters = {name for name, _ in model.named_parameters()}
        sharded = {key: value for key, value in sharded.items() if key in parameters}
        replace_prefix_for_sharding(sharded, "", prefix)
    loaded = dist_checkpointing.load(sharded, str(directory))
    model.load_state_dict(loaded, strict=not prefix)


class HunyuanImage3Family:
    name = "hunyuan_image3"

    # -- configs and networks ------------------------------------------------------------------

    def model_config(self, config, student: bool, trainable: bool | None = None) -> HunyuanImage3Config:
        """The teacher's (or the student's) config: the checkpoint's architecture, or the preset's,
        with ``model.overrides``, the parallel layout and the dtype. ``trainable`` (default: the
        student is, the teacher is not) stores the router weight in the model's dtype, as
        megatron's optimizers need (``router_weight_fp32``)."""
        trainable = student if trainable is None else trainable
        model, parallel = config.model, config.parallel
        dtype = torch.bfloat16 if model.dtype == "bf16" else torch.float32
        settings = dict(model.overrides)
        settings.update(
            tensor_model_parallel_size=parallel.tensor_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_parallel_size,
            expert_model_parallel_size=parallel.expert_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size or parallel.tensor_parallel_size,
            sequence_parallel=parallel.sequence_parallel,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            use_cpu_initialization=not torch.cuda.is_available(),
            image_path=True,
            router_weight_fp32=not trainable,
            sequence_template=model.sequence_template,
            system_prompt=model.system_prompt,
        )
        if student:
            settings.update(use_meanflow=True, cfg_distilled=True, student_conditioning=model.student_conditioning)
        if model.recompute:
            settings.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if model.teacher_checkpoint is not None:
            from models.hunyuan_image3.parallelize import read_checkpoint_info
            from models.hunyuan_image3.state_dict_adapter import config_from_hf

            record = read_checkpoint_info(model.teacher_checkpoint)
            settings["perform_initialization"] = False
            return config_from_hf(record["hf_config"], **settings)
        if model.preset not in HUNYUAN_IMAGE3_CONFIGS:
            raise ValueError(f"unknown HunyuanImage 3.0 preset {model.preset!r}; known: {', '.join(HUNYUAN_IMAGE3_CONFIGS)}")
        return HUNYUAN_IMAGE3_CONFIGS[model.preset](**settings)

    def teacher_config(self, config) -> HunyuanImage3Config:
        """The teacher's config for this recipe (built once per recipe object)."""
        cached = getattr(self, "_teacher_config", None)
        if cached is None or cached[0] is not config:
            self._teacher_config = (config, self.model_config(config, student=False))
        return self._teacher_config[1]

    def _build(self, config, device, student: bool, trainable: bool):
        from models.hunyuan_image3.parallelize import build_hunyuan_model, check_layout, mark_routed_experts

        architecture = self.model_config(config, student, trainable)
        check_layout(architecture, seq_length=self.sequence_length(config))
        return mark_routed_experts(build_hunyuan_model(architecture)).to(device)

    def build_networks(self, config, device: torch.device, with_fake: bool):
        from mfmegatron.jvp.lora import add_lora, share_parameters
        from mfmegatron.training.family import Networks
        from models.hunyuan_image3.meanflow import init_student_from_teacher, lora_covers

        teacher = self._build(config, device, student=False, trainable=False)
        if config.model.teacher_checkpoint is not None:
            load_dist_checkpoint(teacher, config.model.teacher_checkpoint)
        teacher.requires_grad_(False)
        teacher.classifier_free_guidance = True  # stage_forward runs it as the CFG teacher
        student = self._build(config, device, student=True, trainable=True)
        init_student_from_teacher(student, teacher)
        fake = None
        if with_fake:
            alignment = config.alignment
            # A LoRA fake network trains its factors only; its weights are the teacher's.
            fake = self._build(config, device, student=False, trainable=alignment.fake_network != "lora")
            if alignment.fake_network == "lora":
                share_parameters(fake, teacher)
                add_lora(fake, alignment.lora_rank, alignment.lora_alpha, seed=config.train.seed,
                         global_name=lambda name: self._global_name(fake, name), include=lora_covers)
            else:
                with torch.no_grad():
                    for (_, target), (_, source) in zip(fake.named_parameters(), teacher.named_parameters()):
                        target.copy_(source)
        return Networks(teacher=teacher, student=student, fake=fake)

    @staticmethod
    def _global_name(model, name: str) -> str:
        from models.hunyuan_image3.parallelize import local_to_global_key

        return local_to_global_key(name, 0, model.layer_range[0])

    def build_flow_network(self, config, device: torch.device):
        """The teacher architecture, trainable (``train.objective=flow_matching``, pixel space
        only: the released latents need HunyuanImage 3.0's VAE, which this project does not
        have); from ``model.teacher_checkpoint`` when set, to fine-tune."""
        if not self.pixel_space(config):
            raise ValueError("train.objective=flow_matching needs HunyuanImage 3.0's VAE, which this project does not "
                             "have; train a pixel-space teacher with model.latent_space=pixels")
        network = self._build(config, device, student=False, trainable=True)
        if config.model.teacher_checkpoint is not None:
            load_dist_checkpoint(network, config.model.teacher_checkpoint)
        return network

    # -- shapes and conditioning ---------------------------------------------------------------

    @staticmethod
    def pixel_space(config) -> bool:
        return config.model.latent_space == "pixels"

    def latent_grid(self, config) -> tuple[int, int]:
        size = config.model.image_size
        return check_image_size(size, size, config.model.image_base_size, pixels_per_cell(config),
                                config.model.sequence_template)

    def latent_channels(self, config) -> int:
        """The networks' latent channels; in pixel space checked to be RGB in PIXEL_PATCH² cells."""
        channels = self.teacher_config(config).latent_channels
        if self.pixel_space(config) and channels != 3 * PIXEL_PATCH**2:
            raise ValueError(f"model.latent_space=pixels needs latent_channels {3 * PIXEL_PATCH**2} (RGB in "
                             f"{PIXEL_PATCH}x{PIXEL_PATCH} patches); the network has {channels} "
                             "(set model.overrides.latent_channels)")
        return channels

    def latent_shape(self, config) -> tuple[int, ...]:
        h, w = self.latent_grid(config)
        return (self.latent_channels(config), h, w)

    def sequence_length(self, config) -> int:
        """Every sequence's length (``memory.sequence_length``, which the planner counts too)."""
        h, w = self.latent_grid(config)
        return sequence_length(config, h * w)

    def text_conditioning(self, config, device, dtype) -> PromptTokenizer:
        """The model's tokenizer (``data.text_tokenizer``: a ``tokenizer.json``); the image size,
        the guidance range and the special tokens are checked here, before any network."""
        data, model = config.data, config.model
        if data.text_tokenizer is None:
            raise ValueError("HunyuanImage 3.0 tokenises its prompts: set data.text_tokenizer to the model's tokenizer.json")
        if data.text_encoder != "precomputed":
            raise ValueError(f"data.text_encoder={data.text_encoder} does not apply to HunyuanImage 3.0 (the model "
                             "embeds its own tokens): leave it unset")
        if config.meanflow.z_source == "data" and not self.pixel_space(config):
            raise ValueError("meanflow.z_source=data needs the model's VAE, which this project does not have for "
                             "HunyuanImage 3.0; use meanflow.z_source=teacher_ode (or model.latent_space=pixels)")
        check_guidance_settings(model)
        self.latent_shape(config)
        tokenizer = PromptTokenizer(data.text_tokenizer, model.image_base_size, model.sequence_template,
                                    model.system_prompt)
        vocab = self.teacher_config(config).vocab_size
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"data.text_tokenizer {data.text_tokenizer} has {tokenizer.vocab_size} tokens, more "
                             f"than the model's vocabulary of {vocab}")
        tokenizer.prompt_budget(model.text_tokens)
        return tokenizer

    def condition(self, batch, config, device, dtype, text=None, draw=None) -> HunyuanCondition:
        """The prompts' sequences (teacher's, unconditional, student's) padded to
        ``sequence_length`` and each sample's guidance scale."""
        if text is None:
            text = self.text_conditioning(config, device, dtype)
        size = config.model.image_size
        tokens = text.image_tokens(size, size)
        prompts = text.encode(batch.prompts, config.model.text_tokens)
        grid, length = self.latent_grid(config), self.sequence_length(config)
        sequence = build_image_sequences(prompts, grid, tokens, length=length, template=text.template)
        if config.model.student_conditioning == "tokens":
            student = build_image_sequences(prompts, grid, tokens, length=length, student_tokens=True,
                                            template=text.template)
        else:
            student = sequence
        low, high = guidance_range(config)
        unconditional = unconditional_sequences(sequence, tokens)
        dropped = None
        if config.train.objective == "flow_matching":
            dropped = dropped_prompts(config.model.prompt_dropout, len(prompts), draw)
            sequence = drop_prompts(sequence, unconditional, dropped)
        return HunyuanCondition(
            sequence=sequence.to(device), unconditional=unconditional.to(device),
            student_sequence=student.to(device),
            guidance=guidance_scales(low, high, len(prompts), draw).to(device),
            dropped=None if dropped is None else dropped.to(device),
        )

    def condition_stats(self, cond: HunyuanCondition) -> dict[str, float]:
        """Flow-matching training logs the fraction of samples whose prompt it dropped."""
        if cond.dropped is None:
            return {}
        return {"prompt_dropped": float(cond.dropped.float().mean())}

    def slice_condition(self, cond: HunyuanCondition, rows, batch_size: int | None) -> HunyuanCondition:
        """``rows``: a slice or a tensor of row indices of the batch."""
        return HunyuanCondition(
            sequence=select_sequence_rows(cond.sequence, rows),
            unconditional=select_sequence_rows(cond.unconditional, rows),
            student_sequence=select_sequence_rows(cond.student_sequence, rows),
            guidance=cond.guidance[rows],
            dropped=None if cond.dropped is None else cond.dropped[rows],
        )

    def image_encoder(self, config, device, dtype):
        """Pixel space: images [b, 3, H, W] in [-1, 1] -> their PIXEL_PATCH space-to-depth grid."""
        if not self.pixel_space(config):
            raise ValueError("HunyuanImage 3.0's VAE is not in this project: use meanflow.z_source=teacher_ode "
                             "(or model.latent_space=pixels)")
        self.latent_channels(config)
        return lambda images, generator=None: space_to_depth(images.float(), PIXEL_PATCH)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # the networks map the VAE's latent grid [b, C, h, w] as it is

    # -- running a stage ----------------------------------------------------------------------

    def stage_forward(self, model, z, r, t, cond: HunyuanCondition, tangents):
        dtype = model.config.params_dtype
        z = z.to(dtype)
        if is_guided(model):
            if tangents is not None:
                raise NotImplementedError("the CFG teacher is evaluated without tangents")
            if not model.pre_process:
                model.input_tensor = from_transport(model.input_tensor)
            both = cfg_batch(cond.sequence, cond.unconditional)
            v, _ = model.velocity_jvp(both, torch.cat([z, z]), torch.cat([t, t]))
            if not model.post_process:
                return to_transport(v)
            return combine_guidance(v, cond.guidance), None
        tz = tr = tt = None
        if tangents is not None:
            tz, tr, tt = tangents
            tz = tz.to(dtype)
        if r is None or not model.config.is_student:
            # The teacher architecture without guidance (the fake network, a flow-matching
            # network); r, which its sample grids' Euler steps pass, does not enter it.
            out = model.velocity_jvp(cond.sequence, z, t, tz, tt)
        else:
            out = model.velocity_jvp(cond.student_sequence, z, t, tz, tt, sigma_r=r, tsigma_r=tr,
                                     guidance=cond.guidance)
        return out if model.post_process else out[0]

    def pipeline_seq_length(self, model, cond: HunyuanCondition, with_tangent: bool) -> int:
        # Tangent rows, or the CFG batch's unconditional half, travel after the primal's.
        length = cond.sequence.input_ids.shape[1]
        return length * (2 if with_tangent or is_guided(model) else 1)

    def no_grad_activation_bytes_per_sample(self, config, with_tangent: bool) -> float:
        """``memory.no_grad_activation_bytes_per_sample``; without a tangent twice that: the CFG
        teacher runs two sequences per sample (the student's and the fake's plain forwards are
        counted alike: high for them). Evaluations with a tangent are the student's, without CFG."""
        from models.hunyuan_image3.memory import no_grad_activation_bytes_per_sample

        per_sequence = no_grad_activation_bytes_per_sample(self._architecture(config), config, with_tangent)
        return per_sequence if with_tangent else 2 * per_sequence

    def flops_per_sample_forward(self, config) -> float:
        """The CFG teacher's forward FLOPs per sample (``network_flops``)."""
        return self.network_flops(config, "teacher").forward

    # -- memory (tools/memory_plan) ------------------------------------------------------------

    def _architecture(self, config) -> HunyuanImage3Config:
        """The teacher's architecture: its checkpoint's, or the preset's while planning a run
        whose teacher checkpoint does not exist yet."""
        checkpoint = config.model.teacher_checkpoint
        if checkpoint is not None and not Path(checkpoint).exists():
            from models.hunyuan_image3.memory import preset_architecture

            return preset_architecture(config)
        return self.teacher_config(config)

    # -- planning (mfmegatron/planner.py; the arithmetic is models/hunyuan_image3/cost.py) -------

    def network_flops(self, config, network: str):
        from models.hunyuan_image3.cost import network_flops

        return network_flops(self._architecture(config), config, network)

    def pass_traffic(self, config, network: str, phase: str, rows: int, stage: int, with_backward: bool):
        from models.hunyuan_image3.cost import pass_traffic

        return pass_traffic(self._architecture(config), config, network, phase, rows, stage, with_backward)

    def gradient_traffic(self, config, network: str, stage: int, data_parallel_size: int):
        from models.hunyuan_image3.cost import gradient_traffic

        return gradient_traffic(self._architecture(config), config, network, stage, data_parallel_size)

    def layout_problem(self, config) -> str | None:
        from models.hunyuan_image3.cost import layout_problem

        try:
            architecture = self._architecture(config)
        except ValueError as error:  # megatron's own checks of the config at this layout
            return str(error)
        return layout_problem(architecture, config)

    def rank_parameter_counts(self, config) -> dict[str, float]:
        from models.hunyuan_image3.memory import rank_parameter_counts

        return rank_parameter_counts(self._architecture(config), config)

    def activation_bytes(self, config) -> tuple[float, str]:
        from models.hunyuan_image3.memory import activation_bytes

        return activation_bytes(self._architecture(config), config)

    # -- outputs for people --------------------------------------------------------------------

    def decode_images(self, latents: torch.Tensor, config) -> torch.Tensor | None:
        """Pixel space: the images in [0, 1]; otherwise None (no VAE in the project: evaluation
        compares latents)."""
        if not self.pixel_space(config):
            return None
        return to_unit_range(depth_to_space(latents.float(), PIXEL_PATCH))

    def save_sample_grid(self, samples: dict[int, torch.Tensor], path, config) -> None:
        """Rows: number of student steps; columns: samples; the images (pixel space) or the
        first three latent channels."""
        from mfmegatron.training.sample_grid import save_sample_grid

        if self.pixel_space(config):
            images = {steps: depth_to_space(grid.float().cpu(), PIXEL_PATCH) for steps, grid in samples.items()}
            save_sample_grid(images, path, pixels=True)
        else:
            save_sample_grid(samples, path)

    def export_student(self, student, directory, config) -> None:
        """The student in the released Hugging Face layout (sharded safetensors, their index and
        config.json): every rank saves its part as a dist checkpoint beside ``directory``, then
        rank 0 converts it with ``mfmegatron-convert-hunyuan-image3 export`` in a process of its
        own (a world of one, which any training layout can be read into), and removes it."""
        import os
        import shutil
        import subprocess
        import sys

        import torch.distributed as dist

        from models.hunyuan_image3.parallelize import save_dist_checkpoint
        from models.hunyuan_image3.state_dict_adapter import hf_config_from_config

        directory = Path(directory)
        staging = directory.with_name(directory.name + ".checkpoint")
        if dist.get_rank() == 0:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        dist.barrier()
        save_dist_checkpoint(student, staging, hf_config_from_config(student.config))
        if dist.get_rank() == 0:
            # Without this job's torchrun variables: the converter is a job of its own.
            launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
            env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
            result = subprocess.run(
                [sys.executable, "-m", "tools.convert_hunyuan_image3", "export", "--checkpoint", str(staging),
                 "--output", str(directory), "--quiet"],
                cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
            )
            if result.returncode != 0:
                last = result.stderr.strip().splitlines()[-1:] or ["(no message)"]
                raise RuntimeError(f"exporting the student failed: {last[0]}")
            shutil.rmtree(staging)
        dist.barrier()

    def checkpoint_files(self, student, with_ema: bool) -> dict[str, str]:
        """``mfmegatron_hunyuan_image3.json`` with the student's config.json and its weights' key
        prefixes (the EMA's first), so ``mfmegatron-convert-hunyuan-image3 export`` reads a
        training checkpoint."""
        import json

        from models.hunyuan_image3.parallelize import CHECKPOINT_FORMAT, CHECKPOINT_INFO_FILE
        from models.hunyuan_image3.state_dict_adapter import hf_config_from_config

        record = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "dtype": str(student.config.params_dtype).removeprefix("torch."),
            "hf_config": hf_config_from_config(student.config),
            "weight_prefixes": (["ema."] if with_ema else []) + ["student."],
        }
        return {CHECKPOINT_INFO_FILE: json.dumps(record, indent=2) + "\n"}
