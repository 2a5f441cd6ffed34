"""Few-step text-to-image generation with a MeanFlow-distilled FLUX student, on diffusers' components.

The student is FLUX.1 plus one module, the interval embedding of ``h = t - r``; it predicts the
*average* velocity ``u(z_t, r, t)`` and one jump is ``z_r = z_t - (t - r) u(z_t, r, t)``. Sampling
goes from noise at t = 1 to the image at t = 0 on a decreasing grid ``1 = t_0 > ... > t_K = 0``
with one transformer evaluation per step; there is no scheduler.

``MeanFlowFluxPipeline`` is diffusers' ``FluxPipeline`` with its sampling loop replaced: prompt
encoding (CLIP pooled + T5), latent packing / unpacking, latent image ids and VAE decoding are
FluxPipeline's own methods, and the transformer is diffusers' ``FluxTransformer2DModel``,
unmodified. The interval embedding is applied by a forward hook on
``transformer.time_text_embed`` that adds ``interval_embedder(1000 * h)`` to its output (the
conditioning vector temb) for the h of the current step. A hook rather than a wrapper module
keeps the transformer's module tree and state-dict keys as diffusers has them, so
``transformer.save_pretrained``, LoRA loading and offloading work unchanged.

Example::

    pipe = MeanFlowFluxPipeline.from_pretrained(
        "student-diffusers",                 # mfmegatron-convert-flux export output
        base_pipeline="FLUX.1-dev",          # VAE, CLIP, T5 and tokenizers (a FLUX pipeline folder)
        torch_dtype=torch.bfloat16,
    ).to("cuda")
    image = pipe("a red fox in the snow", num_inference_steps=2,
                 generator=torch.Generator("cuda").manual_seed(0)).images[0]
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from mfmegatron.sampling.few_step import check_time_grid as check_sampling_grid
from mfmegatron.sampling.few_step import uniform_time_grid
from models.flux import interval_embedder as interval_format

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# FLUX.1's resolution-dependent time shift (its scheduler_config.json): mu grows linearly with the
# number of image tokens from base_shift at 256 tokens to max_shift at 4096 (1024 x 1024).
FLUX_TIME_SHIFT = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


# --------------------------------------------------------------------------- time grids


def check_time_grid(timesteps: Sequence[float]) -> list[float]:
    """A user grid for sampling from noise to an image: the sampler's checks (strictly
    decreasing, inside [0, 1]), starting at 1 and ending at 0."""
    grid = check_sampling_grid(timesteps)
    if grid[0] != 1.0 or grid[-1] != 0.0:
        raise ValueError(f"timesteps must start at 1 (noise) and end at 0 (image), got {grid}")
    return grid


def shift_time_grid(grid: Sequence[float], mu: float) -> list[float]:
    """FLUX's time shift ``t -> e^mu / (e^mu + 1/t - 1)`` (the end points 1 and 0 stay)."""
    shifted = []
    for t in grid:
        shifted.append(t if t in (0.0, 1.0) else math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)))
    return shifted


def flux_time_shift_mu(image_seq_len: int) -> float:
    """FLUX.1's mu for an image of ``image_seq_len`` packed latent tokens."""
    c = FLUX_TIME_SHIFT
    return calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])


# --------------------------------------------------------------------------- the interval embedding


class MeanFlowIntervalEmbedder(torch.nn.Module):
    """The student's embedding of ``h = t - r``: diffusers' ``Timesteps(256, flip_sin_to_cos=True,
    downscale_freq_shift=0)`` of ``1000 * h``, then ``TimestepEmbedding(256, D)`` (linear, SiLU,
    linear) -- the structure of FLUX's ``time_text_embed.timestep_embedder``.

    ``embedder.state_dict()`` has the keys of ``interval_embedder.safetensors`` (``linear_1.weight`` ...).
    """

    input_scale = 1000.0

    def __init__(self, embedding_dim: int, num_channels: int = 256):
        super().__init__()
        self.embedding_dim, self.num_channels = embedding_dim, num_channels
        self.time_proj = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedder = TimestepEmbedding(num_channels, embedding_dim)

    def forward(self, interval: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``interval``: h = t - r per sample ([b], sigmas); ``dtype``: that of the transformer's
        timestep (h is scaled in it, as diffusers' FLUX scales t)."""
        weight_dtype = self.embedder.linear_1.weight.dtype
        scaled = interval.to(dtype or weight_dtype) * self.input_scale
        return self.embedder(self.time_proj(scaled).to(weight_dtype))

    @classmethod
    def from_pretrained(cls, folder, torch_dtype: torch.dtype | None = None) -> "MeanFlowIntervalEmbedder":
        """Reads ``interval_embedder.safetensors`` / ``.json`` from a student's transformer folder."""
        record, tensors = interval_format.load(folder)
        expected = interval_format.describe(record["embedding_dim"], record.get("num_channels", 256))
        for field in ("sinusoid", "input_scale", "act_fn"):
            if record.get(field) != expected[field]:
                raise interval_format.IntervalEmbedderFormatError(
                    f"{folder}: interval embedder {field}={record.get(field)!r} is not supported "
                    f"(expected {expected[field]!r})"
                )
        module = cls(record["embedding_dim"], record.get("num_channels", 256))
        module.embedder.load_state_dict(tensors)
        return module.to(torch_dtype) if torch_dtype is not None else module

    def save_pretrained(self, folder) -> None:
        """Writes ``interval_embedder.safetensors`` / ``.json`` into ``folder`` (next to the transformer)."""
        interval_format.save(folder, self.embedder.state_dict(), num_channels=self.num_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedder.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedder.linear_1.weight.device


class _IntervalConditioning:
    """Forward hook on ``transformer.time_text_embed``: ``temb + interval_embedder(h)`` for the h
    set by ``with conditioning.interval(h):``."""

    def __init__(self, embedder: MeanFlowIntervalEmbedder):
        self.embedder = embedder
        self.current: torch.Tensor | None = None

    @contextlib.contextmanager
    def interval(self, h: torch.Tensor):
        self.current = h
        try:
            yield
        finally:
            self.current = None

    def __call__(self, module, args, temb: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError(
                "this FLUX transformer belongs to a MeanFlowFluxPipeline and needs the interval h = t - r: "
                "call it through MeanFlowFluxPipeline.mean_velocity(latents, r, t, ...)"
            )
        h = self.current.to(self.embedder.device)
        return temb + self.embedder(h, dtype=temb.dtype).to(device=temb.device, dtype=temb.dtype)


def attach_interval_embedder(transformer: FluxTransformer2DModel, embedder: MeanFlowIntervalEmbedder | None):
    """Hooks ``embedder`` onto ``transformer.time_text_embed`` (replacing a hook attached before);
    returns the conditioning object (``None`` and no hook when ``embedder`` is None)."""
    previous = getattr(transformer, "_mfmegatron_interval_hook", None)
    if previous is not None:
        previous.remove()
        transformer._mfmegatron_interval_hook = None
    if embedder is None:
        return None
    conditioning = _IntervalConditioning(embedder)
    transformer._mfmegatron_interval_hook = transformer.time_text_embed.register_forward_hook(conditioning)
    return conditioning


# --------------------------------------------------------------------------- the pipeline


class MeanFlowFluxPipeline(FluxPipeline):
    r"""Text-to-image in 1-4 steps with a MeanFlow-distilled FLUX student.

    Components: ``transformer`` (diffusers ``FluxTransformer2DModel``, the teacher architecture),
    ``interval_embedder`` (``MeanFlowIntervalEmbedder``; ``None`` runs the transformer alone, i.e.
    Euler steps with its instantaneous velocity -- a baseline for a plain FLUX), ``vae``
    (``AutoencoderKL``), ``text_encoder`` / ``tokenizer`` (CLIP), ``text_encoder_2`` /
    ``tokenizer_2`` (T5): the components of diffusers' ``FluxPipeline`` without the scheduler.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->interval_embedder->transformer->vae"
    _optional_components = ["interval_embedder"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        transformer: FluxTransformer2DModel,
        interval_embedder: MeanFlowIntervalEmbedder | None = None,
    ):
        # FluxPipeline.__init__ registers a scheduler, which a MeanFlow student does not use; the
        # attributes it sets besides the components are set here the same way.
        super(FluxPipeline, self).__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            interval_embedder=interval_embedder,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        # Packed latents are 2 x 2 patches of the VAE latents.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77
        self.default_sample_size = 128
        if interval_embedder is not None and interval_embedder.embedding_dim != transformer.inner_dim:
            raise ValueError(
                f"interval_embedder has width {interval_embedder.embedding_dim}, the transformer's "
                f"conditioning has {transformer.inner_dim}"
            )
        self._conditioning = attach_interval_embedder(transformer, interval_embedder)

    # -- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        base_pipeline: str | None = None,
        *,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "MeanFlowFluxPipeline":
        """Loads an exported student and the other FLUX components.

        ``pretrained_model_name_or_path``: a local student folder as ``mfmegatron-convert-flux
        export`` writes it (``config.json``, ``diffusion_pytorch_model*.safetensors``,
        ``interval_embedder.safetensors/.json``), or a folder written by ``save_pretrained`` (the
        student in ``transformer/`` next to the other components).
        ``base_pipeline``: a FLUX pipeline folder or Hub id (e.g. ``black-forest-labs/FLUX.1-dev``)
        supplying ``vae``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2``
        from its subfolders; default: the student folder when it is a full pipeline folder.
        Components may also be passed as keyword arguments (already loaded); the remaining
        keyword arguments (``local_files_only``, ``revision``, ``token`` ...) go to the base
        components' ``from_pretrained``. ``interval_embedder=None`` loads the transformer alone.
        """
        student = Path(pretrained_model_name_or_path)
        names = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "interval_embedder")
        components = {name: kwargs.pop(name) for name in names if name in kwargs}
        if (student / "transformer" / "config.json").is_file():
            transformer_folder, base = student / "transformer", base_pipeline or student
        elif (student / "config.json").is_file():
            transformer_folder, base = student, base_pipeline
        else:
            raise FileNotFoundError(
                f"{student}: neither a student transformer folder (config.json) nor a pipeline folder "
                "(transformer/config.json)"
            )
        config_path, field = transformer_folder / "config.json", interval_format.TIME_EMBEDDING_SCALE_FIELD
        if field in json.loads(config_path.read_text()):
            raise ValueError(f"{config_path}: {field} — this transformer embeds time with another scale than "
                             "FLUX's 1000, which diffusers' FluxTransformer2DModel cannot; run it with mfmegatron "
                             "(mfmegatron-convert-flux import)")
        if "transformer" not in components:
            components["transformer"] = FluxTransformer2DModel.from_pretrained(
                str(transformer_folder), torch_dtype=torch_dtype
            )
        if "interval_embedder" not in components:
            components["interval_embedder"] = MeanFlowIntervalEmbedder.from_pretrained(transformer_folder, torch_dtype)

        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        loaders = {
            "vae": lambda: AutoencoderKL.from_pretrained(str(base), subfolder="vae", torch_dtype=torch_dtype, **kwargs),
            "text_encoder": lambda: CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder", dtype=torch_dtype, **kwargs),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(str(base), subfolder="tokenizer", **kwargs),
            "text_encoder_2": lambda: T5EncoderModel.from_pretrained(str(base), subfolder="text_encoder_2", dtype=torch_dtype, **kwargs),
            "tokenizer_2": lambda: T5TokenizerFast.from_pretrained(str(base), subfolder="tokenizer_2", **kwargs),
        }
        missing = [name for name in loaders if name not in components]
        if missing and base is None:
            raise ValueError(
                f"{student} holds only the student transformer: pass base_pipeline= (a FLUX pipeline folder "
                f"or Hub id) for {', '.join(missing)}, or pass them as arguments"
            )
        for name in missing:
            components[name] = loaders[name]()
        return cls(**components)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Writes every component into its subfolder (FLUX's pipeline layout); the interval
        embedder goes into ``transformer/`` beside the weights, as the export writes it.
        ``from_pretrained(save_directory)`` loads it back."""
        directory = Path(save_directory)
        for name in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            component = getattr(self, name)
            if component is not None:
                component.save_pretrained(str(directory / name), **kwargs)
        if self.interval_embedder is not None:
            self.interval_embedder.save_pretrained(directory / "transformer")

    # -- the student ------------------------------------------------------------------------

    def mean_velocity(
        self,
        latents: torch.Tensor,
        r: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        latent_image_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The student's average velocity ``u(z_t, r, t)`` on packed latents [b, s, c]; t, r: [b]
        sigmas with r <= t. Without an interval embedder: the transformer's velocity at t."""
        call = contextlib.nullcontext() if self._conditioning is None else self._conditioning.interval(t - r)
        with call:
            return self.transformer(
                hidden_states=latents,
                timestep=t,
                guidance=guidance,
                pooled_projections=pooled_prompt_embeds,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=latent_image_ids,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]

    def time_grid(
        self,
        num_inference_steps: int = 4,
        timesteps: Sequence[float] | None = None,
        time_shift: bool = False,
        image_seq_len: int | None = None,
    ) -> list[float]:
        """The decreasing grid ``1 = t_0 > ... > t_K = 0``: ``timesteps`` as given, or uniform in
        ``num_inference_steps`` steps, FLUX-shifted for ``image_seq_len`` tokens if ``time_shift``."""
        if timesteps is not None:
            if time_shift:
                raise ValueError("time_shift applies to the uniform grid; give timesteps already shifted")
            return check_time_grid(timesteps)
        grid = uniform_time_grid(num_inference_steps)
        if time_shift:
            if image_seq_len is None:
                raise ValueError("time_shift needs image_seq_len (packed latent tokens)")
            grid = shift_time_grid(grid, flux_time_shift_mu(image_seq_len))
        return grid

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        timesteps: Sequence[float] | None = None,
        time_shift: bool = False,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' convention)
        max_sequence_length: int = 512,
    ) -> FluxPipelineOutput | tuple:
        r"""Generates images in ``num_inference_steps`` MeanFlow jumps.

        Args:
            prompt, prompt_2: the prompt(s) for CLIP and T5 (``prompt_2`` defaults to ``prompt``);
                or ``prompt_embeds`` + ``pooled_prompt_embeds``.
            height, width: image size in pixels (default 1024 for FLUX's VAE); multiples of 16.
            num_inference_steps: K >= 1 jumps on the uniform grid ``t_k = 1 - k / K`` (1, 2 and 4 are
                what a student is distilled for).
            timesteps: instead, a decreasing grid from 1 to 0, e.g. ``[1.0, 0.75, 0.0]``.
            time_shift: apply FLUX.1's resolution-dependent shift (mu from the image token count) to
                the uniform grid. Default False: a MeanFlow student predicts the average velocity over
                any interval, so it needs no shift to correct discretisation error, and the student's
                few-step rollouts in training use the uniform grid; one step is the same either way.
            guidance_scale: the embedded guidance of guidance-distilled students (FLUX.1-dev style);
                ignored when the transformer has no guidance embedding.
            num_images_per_prompt, generator, latents: as FluxPipeline (``latents``: packed initial
                noise [b, s, c]).
            output_type: "pil", "np", "pt" or "latent" (the final packed latents [b, s, c]).
            callback_on_step_end: ``fn(pipe, step, t, {"latents": ...})`` after each jump; may return
                ``{"latents": ...}`` to replace them.

        Returns: ``FluxPipelineOutput(images=...)``, or ``(images,)`` with ``return_dict=False``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        grid = self.time_grid(num_inference_steps, timesteps, time_shift, image_seq_len=latents.shape[1])
        self._num_timesteps = len(grid) - 1
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])
        else:
            guidance = None

        with self.progress_bar(total=len(grid) - 1) as progress_bar:
            for step, (t_now, t_next) in enumerate(zip(grid[:-1], grid[1:])):
                if self.interrupt:
                    continue
                t = torch.full((latents.shape[0],), t_now, dtype=latents.dtype, device=device)
                r = torch.full((latents.shape[0],), t_next, dtype=latents.dtype, device=device)
                self._current_timestep = t
                u = self.mean_velocity(
                    latents, r, t, prompt_embeds, pooled_prompt_embeds, text_ids, latent_image_ids,
                    guidance, self._joint_attention_kwargs,
                )
                # One MeanFlow jump: z_r = z_t - (t - r) u(z_t, r, t), in float32 as diffusers'
                # flow-matching scheduler steps (exactly the model dtype's arithmetic in fp32).
                h = (t.float() - r.float())[:, None, None]
                latents = (latents.float() - h * u.float()).to(latents.dtype)
                if callback_on_step_end is not None:
                    callback_kwargs = {name: locals()[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, step, t_now, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
            latents = latents.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)


__all__ = [
    "MeanFlowFluxPipeline",
    "MeanFlowIntervalEmbedder",
    "attach_interval_embedder",
    "check_time_grid",
    "flux_time_shift_mu",
    "shift_time_grid",
    "uniform_time_grid",
]
