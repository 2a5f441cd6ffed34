"""FLUX as a model family of the trainer (``mfmegatron.training.family.ModelFamily``)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from mfmegatron.jvp.fp8 import megatron_fp8_settings, teacher_weights_in_fp8
from mfmegatron.jvp.lora import add_lora, share_parameters
from mfmegatron.pixels import to_unit_range
from mfmegatron.training.guidance import (
    check_guidance_settings,
    combine_guidance,
    dropped_prompts,
    from_transport,
    guidance_scales,
    is_guided,
    to_transport,
)
from models.flux.config import FLUX_CONFIGS, FluxConfig
from models.flux.cost import (
    NetworkFlops,
    gradient_buffer_elements,
    network_flops,
    on_stage,
    pipeline_traffic,
    tensor_parallel_traffic,
)
from models.flux.meanflow import FluxCondition, init_student_from_teacher
from models.flux.model import FluxModel, FluxTangents
from models.flux.parallelize import (
    build_flux_model,
    flux_config_from_checkpoint,
    load_dist_checkpoint,
    meta_full_model,
    pipeline_seq_length,
    teacher_with_fp8_weights,
)
from models.flux.state_dict_adapter import CHECKPOINT_ARCHITECTURE_FIELDS, megatron_block_key_to_global
from models.flux.vae import PATCH, FluxImageEncoder, PixelImageEncoder, pack_latents, unpack_latents

# Whole networks on the meta device by (preset, overrides, dtype, student, CFG): shapes for planning.
_META_MODELS: dict[tuple, FluxModel] = {}


def _plain(value):
    """Lists for tuples, so a recipe's [8, 12, 12] equals a config's (8, 12, 12)."""
    return list(value) if isinstance(value, (list, tuple)) else value


# FLUX's VAE downsamples by 8 and the transformer packs 2x2 latent patches: 16 pixels per token.
PIXELS_PER_TOKEN = 16


class FluxFamily:
    name = "flux"
    transformer_engine_spec = True
    """models/flux/layer_specs.py builds the networks from TE layers (model.use_transformer_engine,
    model.fp8)."""

    # -- configs and networks ------------------------------------------------------------------

    def model_config(self, config, student: bool) -> FluxConfig:
        flux = self._network_config(config, student)
        if student and config.model.guidance_range is not None:
            # A CFG teacher's student learns w through a guidance embedding of its own
            # (zero-initialised by init_student_from_teacher: it starts as the conditional teacher).
            flux = dataclasses.replace(flux, guidance_embeds=True)
        return flux

    def _network_config(self, config, student: bool) -> FluxConfig:
        model, parallel = config.model, config.parallel
        dtype = torch.bfloat16 if model.dtype == "bf16" else torch.float32
        settings = dict(model.overrides)
        settings.update(
            tensor_model_parallel_size=parallel.tensor_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_parallel_size,
            sequence_parallel=parallel.sequence_parallel,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            mean_flow_student=student,
            use_cpu_initialization=not torch.cuda.is_available(),
            use_transformer_engine=model.use_transformer_engine,
            **megatron_fp8_settings(model.fp8),
        )
        if model.recompute:
            settings.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if model.teacher_checkpoint is not None:
            # The checkpoint records its architecture; the preset and overrides must not
            # contradict it (a teacher recipe's overrides, when it resumes from a checkpoint).
            settings["perform_initialization"] = False
            architecture = {key: settings.pop(key) for key in CHECKPOINT_ARCHITECTURE_FIELDS if key in settings}
            flux = flux_config_from_checkpoint(model.teacher_checkpoint, **settings)
            for key, value in architecture.items():
                stored = getattr(flux, key)
                if _plain(stored) != _plain(value):
                    raise ValueError(f"model.overrides.{key}={value} contradicts the teacher checkpoint "
                                     f"{model.teacher_checkpoint}, whose {key} is {stored}")
            return flux
        if model.preset not in FLUX_CONFIGS:
            raise ValueError(f"unknown FLUX preset {model.preset!r}; known: {', '.join(FLUX_CONFIGS)}")
        return FLUX_CONFIGS[model.preset](**settings)

    def build_networks(self, config, device: torch.device, with_fake: bool):
        from mfmegatron.training.family import Networks

        teacher = build_flux_model(self.model_config(config, student=False)).to(device)
        if config.model.teacher_checkpoint is not None:
            load_dist_checkpoint(teacher, config.model.teacher_checkpoint)
        teacher.requires_grad_(False)
        # stage_forward runs it against the empty prompt, as ``uncond + w (cond - uncond)``.
        teacher.classifier_free_guidance = config.model.guidance_range is not None
        student = build_flux_model(self.model_config(config, student=True)).to(device)
        init_student_from_teacher(student, teacher)
        fake = None
        alignment = config.alignment
        if with_fake:
            fake = build_flux_model(self.model_config(config, student=False)).to(device)
            if alignment.fake_network == "full":
                with torch.no_grad():
                    for (_, target), (_, source) in zip(fake.named_parameters(), teacher.named_parameters()):
                        target.copy_(source)
        if teacher_weights_in_fp8(config.model.fp8, config.model.fp8_teacher_weights):
            # After the student and a full fake copied the full-precision weights.
            teacher = teacher_with_fp8_weights(teacher, device)
        if with_fake and alignment.fake_network == "lora":
            # The teacher's own (frozen) weights plus trainable low-rank updates of every
            # tensor-parallel linear; the fake's freshly built weights are dropped.
            share_parameters(fake, teacher)
            add_lora(fake, alignment.lora_rank, alignment.lora_alpha, seed=config.train.seed,
                     global_name=lambda name: megatron_block_key_to_global(name, fake.block_range, fake.config))
        return Networks(teacher=teacher, student=student, fake=fake)

    def build_flow_network(self, config, device: torch.device) -> FluxModel:
        """The teacher architecture, trainable (``train.objective=flow_matching``)."""
        network = build_flux_model(self.model_config(config, student=False)).to(device)
        if config.model.teacher_checkpoint is not None:
            load_dist_checkpoint(network, config.model.teacher_checkpoint)
        return network

    # -- shapes and conditioning ---------------------------------------------------------------

    @staticmethod
    def _pixels_per_token(config) -> int:
        return PATCH if config.model.latent_space == "pixels" else PIXELS_PER_TOKEN

    def _latent_grid(self, config) -> int:
        per_token = self._pixels_per_token(config)
        side, remainder = divmod(config.model.image_size, per_token)
        if remainder:
            raise ValueError(f"model.image_size must be a multiple of {per_token}, got {config.model.image_size}")
        return side

    def teacher_config(self, config) -> FluxConfig:
        """The teacher's FluxConfig for this recipe (built once per recipe object)."""
        cached = getattr(self, "_teacher_config", None)
        if cached is None or cached[0] is not config:
            self._teacher_config = (config, self.model_config(config, student=False))
        return self._teacher_config[1]

    def latent_shape(self, config) -> tuple[int, ...]:
        flux = self.teacher_config(config)
        return (self._latent_grid(config) ** 2, flux.in_channels * flux.patch_size**2)

    def text_encoder_dims(self, config) -> tuple[int, int]:
        """(T5 token-embedding width, pooled CLIP width) the networks take."""
        flux = self.teacher_config(config)
        return flux.joint_attention_dim, flux.pooled_projection_dim

    def text_conditioning(self, config, device, dtype):
        """The text encoder that fills in a batch's missing embeddings: the deterministic dummy
        (``data.text_tokenizer``: its sentencepiece model), the HF T5/CLIP encoders at
        ``data.text_encoder_path``, or None (``precomputed``: the shards' own embeddings)."""
        from mfmegatron.data import DummyTextEncoder, SentencePieceTokenizer, build_text_encoder

        data, model = config.data, config.model
        width, pooled = self.text_encoder_dims(config)
        if data.text_tokenizer is not None and data.text_encoder != "dummy":
            raise ValueError("data.text_tokenizer is the dummy encoder's; set data.text_encoder=dummy or drop it")
        check_guidance_settings(model)
        if model.guidance_range is not None:
            if self.teacher_config(config).guidance_embeds:
                raise ValueError("model.guidance_range: this teacher has a guidance embedding (guidance-distilled, as "
                                 "FLUX.1-dev) and runs without CFG; give its scale as model.guidance")
        if data.text_encoder == "precomputed":
            if self._needs_empty_prompt(config):
                raise ValueError("classifier-free guidance (model.guidance_range) and prompt dropout "
                                 "(model.prompt_dropout) need the empty prompt's encodings: set data.text_encoder "
                                 "to dummy or hf, or model.prompt_dropout=0 for flow matching")
            return None
        length = config.model.text_tokens
        if data.text_encoder == "dummy":
            tokenizer = None
            if data.text_tokenizer is not None:
                tokenizer = SentencePieceTokenizer(data.text_tokenizer, max_length=length)
            return DummyTextEncoder(t5_dim=width, pooled_dim=pooled, max_length=length, tokenizer=tokenizer,
                                    position_scale=data.text_position_scale,
                                    context_scale=data.text_context_scale)
        return build_text_encoder(
            "hf", flux_path=data.text_encoder_path, device=str(device), dtype=dtype, max_length=length,
        )

    @staticmethod
    def _needs_empty_prompt(config) -> bool:
        """Whether the conditioning carries the empty prompt's encodings: for the CFG teacher, or
        for prompt dropout in flow-matching training."""
        flow_matching = config.train.objective == "flow_matching"
        return config.model.guidance_range is not None or (flow_matching and config.model.prompt_dropout > 0)

    def condition(self, batch, config, device, dtype, text=None, draw=None) -> FluxCondition:
        """T5 states (truncated / zero-padded to ``model.text_tokens``), pooled CLIP, the latent
        grid's ids and the guidance value; embeddings the batch lacks come from ``text`` (the
        encoder). With ``model.guidance_range`` set, the empty prompt's encodings (the CFG
        teacher's unconditional input) and each sample's scale; in flow-matching training,
        ``model.prompt_dropout`` of the samples (keyed by ``draw``: seed, step, first global
        sample; None, evaluation: none) take the empty prompt's encodings instead of their own."""
        from mfmegatron.data import ensure_embeddings

        if text is not None:
            batch = ensure_embeddings(batch, text)
        if batch.t5 is None:
            raise ValueError("the prompts carry no embeddings; set data.text_encoder to dummy or hf")
        width, pooled = self.text_encoder_dims(config)
        if batch.t5.shape[-1] != width or batch.pooled.shape[-1] != pooled:
            raise ValueError(
                f"text embeddings are {batch.t5.shape[-1]}/{batch.pooled.shape[-1]} wide but the "
                f"model takes {width}/{pooled}"
            )
        model, count = config.model, batch.t5.shape[0]
        t5 = self._text_states(batch.t5, model.text_tokens).to(device, dtype)
        pooled_projections = batch.pooled.to(device, dtype)
        empty_t5 = empty_pooled = scale = dropped = None
        if self._needs_empty_prompt(config):
            if text is None:
                raise ValueError("classifier-free guidance and prompt dropout need a text encoder for the empty prompt")
            empty_t5, empty_pooled = self._empty_prompt(text, model.text_tokens)
            empty_t5 = empty_t5.to(device, dtype).expand(count, -1, -1)
            empty_pooled = empty_pooled.to(device, dtype).expand(count, -1)
        if model.guidance_range is not None:
            scale = guidance_scales(*model.guidance_range, count, draw).to(device)
        if config.train.objective == "flow_matching":
            dropped = dropped_prompts(model.prompt_dropout, count, draw).to(device)
            if dropped.any():
                t5 = torch.where(dropped.view(-1, 1, 1), empty_t5, t5)
                pooled_projections = torch.where(dropped.view(-1, 1), empty_pooled, pooled_projections)
        side = self._latent_grid(config)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).flatten(0, 1).float()
        flux = self.teacher_config(config)
        guidance = None
        if flux.guidance_embeds:
            guidance = torch.full((count,), model.guidance, device=device, dtype=dtype)
        return FluxCondition(
            encoder_hidden_states=t5,
            pooled_projections=pooled_projections,
            img_ids=img_ids.to(device),
            txt_ids=torch.zeros(model.text_tokens, 3, device=device),
            guidance=guidance,
            unconditional_hidden_states=empty_t5 if model.guidance_range is not None else None,
            unconditional_pooled=empty_pooled if model.guidance_range is not None else None,
            guidance_scale=scale,
            dropped=dropped,
        )

    def _empty_prompt(self, text, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's T5 states [1, length, d] and pooled CLIP [1, d] through ``text``
        (encoded once per encoder: a T5 forward on real encoders)."""
        cached = getattr(self, "_empty", None)
        if cached is None or cached[0] is not text or cached[1] != length:
            empty = text.encode([""])
            self._empty = (text, length, self._text_states(empty.t5, length), empty.pooled)
        return self._empty[2], self._empty[3]

    @staticmethod
    def _text_states(t5: torch.Tensor, length: int) -> torch.Tensor:
        """T5 states truncated or zero-padded to ``length`` tokens (FLUX attends to a fixed-length
        T5 sequence; the pipelines pad with zeros)."""
        if t5.shape[1] >= length:
            return t5[:, :length]
        return F.pad(t5, (0, 0, 0, length - t5.shape[1]))

    def condition_stats(self, cond: FluxCondition) -> dict[str, float]:
        """Flow-matching training logs the fraction of samples whose prompt it dropped."""
        if cond.dropped is None:
            return {}
        return {"prompt_dropped": float(cond.dropped.float().mean())}

    def slice_condition(self, cond: FluxCondition, rows, batch_size: int | None) -> FluxCondition:
        """``rows``: a slice or a tensor of row indices of the batch."""
        def pick(rows_of):
            return None if rows_of is None else rows_of[rows]

        return dataclasses.replace(
            cond,
            encoder_hidden_states=cond.encoder_hidden_states[rows],
            pooled_projections=cond.pooled_projections[rows],
            guidance=pick(cond.guidance),
            unconditional_hidden_states=pick(cond.unconditional_hidden_states),
            unconditional_pooled=pick(cond.unconditional_pooled),
            guidance_scale=pick(cond.guidance_scale),
            dropped=pick(cond.dropped),
        )

    def image_encoder(self, config, device, dtype) -> FluxImageEncoder:
        """FLUX's VAE at ``model.vae_path`` for ``meanflow.z_source=data``: images -> the packed
        latents the networks map (checked against the transformer's latent channels)."""
        flux = self.teacher_config(config)
        if config.model.latent_space == "pixels":
            return PixelImageEncoder(in_channels=flux.in_channels)
        return FluxImageEncoder.from_pretrained(
            config.model.vae_path, device, dtype, config.model.vae_latent,
            latent_channels=flux.in_channels // PATCH**2, downsample=PIXELS_PER_TOKEN // PATCH,
        )  # fmt: skip

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """FLUX's VAE latents ``[b, 16, h, w]`` -> tokens of 2x2 patches (diffusers' packing)."""
        return pack_latents(latents)

    # -- running a stage ----------------------------------------------------------------------

    def stage_forward(self, model: FluxModel, z, r, t, cond: FluxCondition, tangents):
        if is_guided(model):
            if tangents is not None:
                raise NotImplementedError("the CFG teacher is evaluated without tangents")
            if not model.pre_process:
                model.input_tensor = from_transport(model.input_tensor)
            out = model.forward_jvp(cond.cfg_batch().inputs(torch.cat([z, z]), torch.cat([t, t])))
            if not model.post_process:
                return to_transport(out)
            v, _ = out
            return combine_guidance(v, cond.guidance_scale), None
        inputs = cond.inputs(z, t, r)
        if model.config.guidance_embeds and cond.guidance is None:
            # The student of a CFG teacher: its guidance embedding takes each sample's w.
            inputs = dataclasses.replace(inputs, guidance=cond.guidance_scale)
        flux_tangents = None
        if tangents is not None:
            tangent_z, tangent_r, tangent_t = tangents
            flux_tangents = FluxTangents(latents=tangent_z, timestep=tangent_t, timestep_r=tangent_r)
        return model.forward_jvp(inputs, flux_tangents)

    def pipeline_seq_length(self, model: FluxModel, cond: FluxCondition, with_tangent: bool) -> int:
        # The CFG teacher's unconditional half travels after the conditional one (to_transport).
        length = pipeline_seq_length(model.config, cond.txt_ids.shape[0], cond.img_ids.shape[0], with_tangent)
        return length * (2 if is_guided(model) else 1)

    def no_grad_activation_bytes_per_sample(self, config, with_tangent: bool) -> float:
        """The peak of a no-grad forward is inside one block: the residual rows plus a single
        block's QKV (3h), its 4h MLP hidden and activation and the concatenated 5h projection
        input, column-parallel parts split over TP — about (2 + 14 / TP) x tokens x h values
        per sample. A tangent carries the same again (the blocks free what they can between
        the attention and the MLP; this errs high). Communication buffers are not counted."""
        flux = self._architecture(config)
        tokens = self._latent_grid(config) ** 2 + config.model.text_tokens
        value_bytes = 2 if config.model.dtype == "bf16" else 4
        per_row = tokens * flux.hidden_size * value_bytes * (2 + 14 / config.parallel.tensor_parallel_size)
        # A CFG teacher runs two rows per sample (the others' plain forwards are counted alike:
        # high for them); evaluations with a tangent are the student's, without CFG.
        return per_row * (2 if with_tangent or config.model.guidance_range is not None else 1)

    def flops_per_sample_forward(self, config) -> float:
        """The teacher's forward FLOPs per sample (``network_flops``)."""
        return self.network_flops(config, "teacher").forward

    # -- planning (mfmegatron/planner.py; the arithmetic is models/flux/cost.py) ---------------

    def _planning_config(self, config, network: str) -> FluxConfig:
        """``network``'s FluxConfig at the recipe's layout (the preset's architecture while the
        teacher checkpoint does not exist yet). The fake network and a flow-matching network
        have the teacher's architecture."""
        checkpoint = config.model.teacher_checkpoint
        if checkpoint is None or not Path(checkpoint).exists():
            config = self._preset_only(config)
        return self.model_config(config, student=network == "student")

    def _tokens(self, config) -> tuple[int, int]:
        return self._latent_grid(config) ** 2, config.model.text_tokens

    def network_flops(self, config, network: str) -> NetworkFlops:
        """FLOPs per sample of ``network`` ("teacher", "student", "fake" or "flow"): forward,
        the extra of a forward with a JVP, and backward as the network trains."""
        from mfmegatron.planner import network_training

        flops = network_flops(self._planning_config(config, network), *self._tokens(config),
                              student=network == "student", training=network_training(config, network),
                              lora_rank=config.alignment.lora_rank)
        return flops.times(self._evaluation_rows(config, network))

    @staticmethod
    def _evaluation_rows(config, network: str) -> int:
        """Rows per sample of one evaluation of ``network``: the CFG teacher's [cond; uncond]
        pair (``model.guidance_range`` set), else one."""
        return 2 if network == "teacher" and config.model.guidance_range is not None else 1

    def layout_problem(self, config) -> str | None:
        """Why FLUX cannot run at the recipe's layout, or None: megatron's checks of the config
        (TP dividing the heads, ...), sequence parallelism's (TP dividing the text and image
        token counts) and at most one pipeline stage per block."""
        parallel = config.parallel
        tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        try:
            flux = self._planning_config(config, "teacher")
        except ValueError as error:
            return str(error)
        image, text = self._tokens(config)
        if flux.ffn_hidden_size % tp:
            return f"TP={tp} does not divide the MLP width {flux.ffn_hidden_size}"
        if parallel.sequence_parallel and (image % tp or text % tp):
            return f"sequence parallel needs TP={tp} to divide {image} image and {text} text tokens"
        if pp > flux.num_layers:
            return f"PP={pp} exceeds the {flux.num_layers} blocks"
        return None

    def pass_traffic(self, config, network: str, phase: str, rows: int, stage: int, with_backward: bool):
        """Collectives of one micro-batch of ``rows`` samples through ``network``'s pipeline
        ``stage``: its TP collectives (``phase`` "forward" or "forward_jvp"; and the backward's
        when ``with_backward``) and its pipeline sends and receives."""
        from mfmegatron.planner import network_training

        flux = self._planning_config(config, network)
        image, text = self._tokens(config)
        rows *= self._evaluation_rows(config, network)
        volume = tensor_parallel_traffic(flux, image, text, rows, stage, phase)
        if with_backward:
            volume = volume + tensor_parallel_traffic(flux, image, text, rows, stage, "backward",
                                                      network_training(config, network),
                                                      config.alignment.lora_rank)
        return volume + pipeline_traffic(flux, image, text, rows, stage, phase == "forward_jvp", with_backward)

    def gradient_traffic(self, config, network: str, stage: int, data_parallel_size: int):
        """Collectives of one optimizer step of ``network`` on pipeline ``stage``'s ranks: the
        TP sum of replicated weights' partial gradients (megatron's ``finalize_model_grads``),
        the data-parallel gradient all-reduce (with the distributed optimizer: reduce-scatter,
        then the updated parameters' all-gather) over megatron DDP's buffer of the stage's
        trained parameters (shapes from the preset, as ``rank_parameter_counts``)."""
        from mfmegatron.jvp.linear import ColumnParallelLinear, RowParallelLinear
        from mfmegatron.planner import CollectiveVolume, network_training

        volume = CollectiveVolume()
        flux = self._planning_config(config, network)
        training = network_training(config, network)
        tp = flux.tensor_model_parallel_size
        weight = flux.params_dtype.itemsize
        grad = 4 if config.optim.grad_reduce_in_fp32 else weight
        model = self._meta_model(config, student=network == "student")
        numels = []
        if training == "lora":
            rank = config.alignment.lora_rank
            for name, layer in model.named_modules():
                if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)) and on_stage(flux, name, stage):
                    out_features, in_features = layer.weight.shape
                    if isinstance(layer, ColumnParallelLinear):
                        numels += [rank * in_features, out_features // tp * rank]
                    else:
                        numels += [rank * in_features // tp, out_features * rank]
        else:
            for name, param in model.named_parameters():
                if on_stage(flux, name, stage):
                    split = getattr(param, "tensor_model_parallel", False)
                    numels.append(param.numel() // (tp if split else 1))
            # Replicated weights with partial gradients, summed in one call: the QK norms and,
            # with SP, the row-parallel biases (added to each rank's sequence chunk).
            summed = 0
            for name, layer in model.named_modules():
                if not on_stage(flux, name, stage):
                    continue
                if name.endswith(("q_layernorm", "k_layernorm")):
                    summed += layer.weight.numel()
                if flux.sequence_parallel and isinstance(layer, RowParallelLinear) and layer.bias is not None:
                    summed += layer.bias.numel()
            if tp > 1 and summed:
                volume.add("tp", "all_reduce", summed * grad)
        if data_parallel_size > 1:
            distributed = config.parallel.use_distributed_optimizer
            elements = gradient_buffer_elements(numels, data_parallel_size, distributed)
            if distributed:
                volume.add("dp", "reduce_scatter", elements * grad)
                volume.add("dp", "all_gather", elements * weight)
            else:
                volume.add("dp", "all_reduce", elements * grad)
        return volume

    # -- memory (mfmegatron/training/memory.py) -------------------------------------------------

    @staticmethod
    def _preset_only(config):
        """A copy of the recipe whose architecture is its preset's (for planning before the
        teacher checkpoint exists)."""
        plan = copy.deepcopy(config)
        plan.model.teacher_checkpoint = None
        return plan

    def _architecture(self, config) -> FluxConfig:
        """The teacher's architecture: its checkpoint's, or the preset's while planning a run
        whose teacher checkpoint does not exist yet."""
        checkpoint = config.model.teacher_checkpoint
        if checkpoint is not None and not Path(checkpoint).exists():
            config = self._preset_only(config)
        return self.teacher_config(config)

    def _meta_model(self, config, student: bool) -> FluxModel:
        """The whole network of the recipe's preset at TP = PP = 1 on the meta device (shapes
        only). Rebuilds megatron's process groups at TP=1 when they are at another layout: a
        planning call, not one for a training process."""
        from megatron.core import parallel_state

        from mfmegatron.parallel import initialize_parallel

        model = config.model
        # A CFG teacher's student has a guidance embedding of its own (model_config).
        key = (model.preset, repr(sorted(model.overrides.items())), model.dtype, student,
               model.guidance_range is not None)
        if key not in _META_MODELS:  # the planner's layout search asks for the same model often
            plan = self._preset_only(config)
            plan.parallel.tensor_parallel_size = plan.parallel.pipeline_parallel_size = 1
            plan.parallel.sequence_parallel = False
            if not (
                parallel_state.model_parallel_is_initialized()
                and parallel_state.get_tensor_model_parallel_world_size() == 1
                and parallel_state.get_pipeline_model_parallel_world_size() == 1
            ):
                initialize_parallel()
            _META_MODELS[key] = meta_full_model(self.model_config(plan, student=student))
        return _META_MODELS[key]

    def rank_parameter_counts(self, config) -> dict[str, float]:
        """Parameters one rank holds: ``teacher``, ``student`` and ``lora`` (the LoRA fake
        network's factors at ``alignment.lora_rank``).

        Counted on the recipe's preset (its teacher checkpoint need not exist yet) built on the
        meta device at TP=1 (no memory), then split as the layout splits it: tensor-parallel
        weights by TP, LoRA factors as ``jvp/lora.py`` splits them (column-parallel: A whole, B
        split; row-parallel: A split, B whole), and the blocks evenly by PP (an average stage;
        the embedders and the final layer are counted on every stage). Rebuilds megatron's
        process groups at TP=1 when they are at another layout: a planning call, not one for a
        training process.
        """
        from mfmegatron.jvp.linear import ColumnParallelLinear, RowParallelLinear

        tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size

        def per_rank(name: str, count: float) -> float:
            return count / pp if name.startswith(("double_blocks.", "single_blocks.")) else count

        counts = {}
        for network, student in (("teacher", False), ("student", True)):
            model = self._meta_model(config, student)
            counts[network] = sum(
                per_rank(name, param.numel() / (tp if getattr(param, "tensor_model_parallel", False) else 1))
                for name, param in model.named_parameters()
            )
            if network == "teacher":
                rank = config.alignment.lora_rank
                counts["lora"] = 0.0
                for name, layer in model.named_modules():
                    if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
                        out_features, in_features = layer.weight.shape
                        if isinstance(layer, ColumnParallelLinear):
                            factors = rank * in_features + rank * out_features / tp
                        else:
                            factors = rank * in_features / tp + rank * out_features
                        counts["lora"] += per_rank(name, factors)
        return counts

    # Bytes of saved activations per block, token and unit of width for 2-byte activations,
    # measured on an H200 with tools/bench_flux_meanflow at 1024 px (README: 9038 MiB saved for
    # backward by a flow-matching step of 2 double + 4 single blocks, width 3072, 4608 tokens,
    # batch 2, less the 2.6 GB of weights autograd keeps). Korthikanti et al. (2022) give 34 for a
    # GPT layer (with dropout masks, without FLUX's QK-norm, RoPE and modulation outputs).
    ACTIVATION_BYTES_PER_TOKEN_WIDTH_BLOCK = 40

    @staticmethod
    def sequence_parallel_saves_chunks(config) -> bool:
        """Whether the networks' column-parallel linears save their input's sequence chunk for
        backward (sequence parallel with the local layers), not the gathered sequence (TE layers:
        ``model.use_transformer_engine`` true, or null, which builds them wherever TE imports)."""
        return bool(config.parallel.sequence_parallel and config.parallel.tensor_parallel_size > 1
                    and config.model.use_transformer_engine is False)

    def activation_bytes(self, config) -> tuple[float, str]:
        """Peak activation memory of one rank in a training pass of one micro-batch, and the
        formula. s tokens (image + text), b the micro-batch, h the width, L the blocks per stage,
        t the TP size, e the element size, c the per-block coefficient above (for 2-byte
        elements). One block holds c·e/2·s·b·h bytes, of which 24/34 split t ways (megatron's
        layers: the tensor-parallel GEMMs' own activations). Sequence parallelism splits the
        other 10/34 too (norms, modulations and the column-parallel GEMMs' inputs: Korthikanti et
        al.) with the local linears (``model.use_transformer_engine=false``), which save their
        input's sequence chunk for backward and gather it again there (``jvp/linear.py``):
        measured (``tools/measure_memory``, TP=2 on CPU) a step's peak with SP is 0.87-0.91x the
        one without, where the old layers gave 0.96-1.00x. The Transformer Engine layers (the
        default where TE imports, so the GPU recipes' count) still save the gathered input, which
        keeps SP from splitting those 10/34. With recompute every block keeps only its input
        (e·s·b·h) and one block at a time is recomputed; without, every block keeps everything.
        The MeanFlow tangent pass stores nothing for backward (measured) but holds one block's
        tangent temporaries in the forward: one block more, counted without the SP split (a
        forward's gathered inputs and partial sums span the whole sequence; added to the
        backward's recomputed block although the two peaks do not coincide: an upper bound). 1F1B keeps up to
        min(PP, micro-batches) micro-batches in flight on the first stage."""
        flux = self._architecture(config)
        parallel = config.parallel
        tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        s = self._latent_grid(config) ** 2 + config.model.text_tokens
        b, h = config.data.micro_batch_size, flux.hidden_size
        blocks = flux.num_layers / pp
        element = 2 if config.model.dtype == "bf16" else 4
        per_block = self.ACTIVATION_BYTES_PER_TOKEN_WIDTH_BLOCK * element / 2 * s * b * h
        # What a block of the forward makes and drops (gathered inputs of primal and tangent,
        # partial sums before the reduction) is over the whole sequence even under SP.
        temporaries = per_block * (10 + 24 / tp) / 34
        one_block = per_block / tp if self.sequence_parallel_saves_chunks(config) else temporaries
        in_flight = min(pp, parallel.num_microbatches)
        if config.model.recompute:
            inputs = element * s * b * h * (1 / tp if parallel.sequence_parallel else 1)
            total = in_flight * blocks * inputs + one_block + temporaries
            formula = f"{in_flight} x {blocks:g} block inputs + 1 block recomputed + 1 block of tangents"
        else:
            total = in_flight * blocks * one_block + temporaries
            formula = f"{in_flight} x {blocks:g} blocks + 1 block of tangents"
        return total, f"{formula}; {s} tokens, micro-batch {b}"

    def decode_images(self, latents: torch.Tensor, config) -> torch.Tensor | None:
        """Networks' latents -> images [n, 3, H, W] in [0, 1]: pixel-space networks' own pixels,
        or FLUX's VAE at ``model.vae_path`` (diffusers' ``AutoencoderKL``, loaded once); None
        without a VAE."""
        side = self._latent_grid(config)
        grid = unpack_latents(latents.float(), side, side)
        if config.model.latent_space == "pixels":
            return to_unit_range(grid)
        if config.model.vae_path is None:
            return None
        vae = getattr(self, "_decoder", None)
        if vae is None:
            from diffusers import AutoencoderKL

            vae = self._decoder = AutoencoderKL.from_pretrained(config.model.vae_path).to(latents.device).eval()
        shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
        with torch.no_grad():
            images = vae.decode(grid.to(vae.dtype) / scale + shift).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    # -- outputs for people --------------------------------------------------------------------

    def save_sample_grid(self, samples: dict[int, torch.Tensor], path, config) -> None:
        """Rows: number of student steps; columns: samples. Pixel-space networks show their
        images; VAE-latent ones the first three latent channels (unpacked to the latent grid),
        each normalised per image (no VAE decode)."""
        from mfmegatron.training.sample_grid import save_sample_grid

        side = self._latent_grid(config)
        grids = {steps: unpack_latents(latents.float().cpu(), side, side) for steps, latents in samples.items()}
        save_sample_grid(grids, path, pixels=config.model.latent_space == "pixels")

    def export_student(self, student: FluxModel, directory, config) -> None:
        """A diffusers FluxTransformer2DModel folder plus the interval embedding (see
        ``models/flux/export.py``); every rank calls it, one writes."""
        from models.flux.export import export_to_diffusers

        export_to_diffusers(student, directory)

    def checkpoint_files(self, student: FluxModel, with_ema: bool) -> dict[str, str]:
        """``mfmegatron_flux.json`` with the student's architecture and its weights' key prefixes
        (the EMA's first), so ``mfmegatron-convert-flux export`` reads a training checkpoint."""
        from models.flux.parallelize import CHECKPOINT_INFO_FILE, checkpoint_info_json
        from models.flux.state_dict_adapter import CheckpointMismatchError, diffusers_config_from_flux

        try:
            diffusers_config = diffusers_config_from_flux(student.config)
        except CheckpointMismatchError:  # an architecture diffusers cannot hold: no export either
            return {}
        prefixes = (["ema."] if with_ema else []) + ["student."]
        return {CHECKPOINT_INFO_FILE: checkpoint_info_json(student.config, diffusers_config, weight_prefixes=prefixes)}

