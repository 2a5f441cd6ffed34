"""The training recipe: one dataclass tree loaded from YAML (``mfmegatron.config.load_config``).

Sections: ``model`` (which backbone, teacher weights), ``parallel`` (TP/PP/SP, micro-batches),
``data`` (prompt shards, text encoder), ``meanflow`` (the objective: ``MeanFlowDistillationConfig``
itself), ``warmup``, ``alignment``, ``optim``, ``train`` (steps, checkpoints, samples) and
``logging``. ``recipes/*.yaml`` are complete examples; every field is documented below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mfmegatron.meanflow import AlignmentConfig, AutomaticWarmupConfig, MeanFlowDistillationConfig


@dataclass
class ModelSection:
    family: str = "flux"
    """Backbone family, looked up in ``mfmegatron.training.family.FAMILIES`` (``flux``,
    ``hunyuan_image3``)."""
    preset: str = "tiny"
    """Architecture preset of the family (flux: ``flux1-dev``, ``flux1-schnell``, ``tiny``;
    hunyuan_image3: ``hunyuan-image3``, ``tiny`` with the image path)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the family's config to change (e.g. ``{num_double_layers: 2}``)."""
    teacher_checkpoint: str | None = None
    """Dist checkpoint of the teacher (``mfmegatron-convert-flux import``). None: random weights
    (smoke tests and benchmarks only)."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    image_size: int = 1024
    """Pixels per side; FLUX's latent tokens are (image_size / 16) ** 2 (``latent_space=vae``),
    HunyuanImage 3.0's latent grid is image_size / 16 per side (one token per latent pixel)."""
    image_base_size: int = 1024
    """HunyuanImage 3.0: the base of the official resolution buckets (the released config's
    ``image_base_size``): the ``<img_size_{base}>`` token, and the buckets ``image_size`` must be
    one of (square: the base itself). Tiny test models use a small base."""
    latent_space: Literal["vae", "pixels"] = "vae"
    """What the networks denoise: the VAE's latents (FLUX: 16 latent channels, 8x down, 2x2
    patches, 16 pixels per token), or the RGB pixels themselves in [-1, 1], folded space-to-depth
    (``mfmegatron/pixels.py``), no VAE: for small worlds such as the shapes world
    (``tools/build_shapes_data.py``). FLUX: 2x2 patches (``in_channels`` 12, (image_size / 2) ** 2
    tokens); HunyuanImage 3.0: 4x4 patches (``latent_channels`` 48, (image_size / 4) ** 2 tokens;
    ``image_base_size`` then counts these pixels)."""
    text_tokens: int = 512
    """FLUX: the T5 sequence length. HunyuanImage 3.0: the text's token budget, the prompt with the
    template's text (``sequence_template``, ``system_prompt``); a longer prompt is an error, not
    truncated; every sequence is padded to the same length."""
    guidance: float = 3.5
    """FLUX: guidance-embedding value given to guidance-distilled teachers and students
    (FLUX.1-dev)."""
    guidance_range: tuple[float, float] | None = None
    """The teacher's classifier-free guidance scale w, drawn per sample uniform in [lo, hi]
    (keyed by seed, step and global sample index); evaluation uses the middle.
    HunyuanImage 3.0: its teacher always runs CFG (unset: [5, 5], the official scale; the student
    gets w through its guidance embedding). FLUX: unset, the teacher runs as it is (FLUX.1-dev is
    guidance-distilled: ``guidance`` feeds its embedding); set, a teacher without a guidance
    embedding (one trained with ``prompt_dropout``) runs CFG against the empty prompt, and the
    student gets a guidance embedding of its own (zero-initialised) that takes w."""
    prompt_dropout: float = 0.1
    """``train.objective=flow_matching``: the fraction of samples trained unconditionally, drawn
    per sample keyed by seed, step and global sample index, so the trained teacher has the
    unconditional velocity classifier-free guidance needs. HunyuanImage 3.0: every prompt token
    replaced by ``<cfg>``; FLUX: the empty prompt's encodings (the unconditional input of its CFG
    teacher)."""
    student_conditioning: Literal["tokens", "embedding"] = "tokens"
    """HunyuanImage 3.0: how the student sees w and r. ``tokens``: the official Instruct-Distil
    layout, ``<guidance>`` and ``<timestep_r>`` tokens after ``<timestep>``; ``embedding``: the
    two embeddings added to ``<timestep>``'s row (no new tokens; starts exactly at the
    conditional teacher)."""
    sequence_template: Literal["pretrain", "instruct"] = "pretrain"
    """HunyuanImage 3.0: the text around the prompt, as the official tokenizer's
    ``sequence_template`` (each checkpoint's ``generation_config.json`` names its own).
    ``pretrain`` (the base model): ``<bos> prompt <boi> … <eoi>``. ``instruct``
    (HunyuanImage-3.0-Instruct and its Distil release): ``<bos> [system "\n\n"] "User: " prompt
    "\n\n" "Assistant: " <answer> <boi> … <eoi> </answer> "\n\n"``. Teacher and student see the
    same template; the unconditional CFG sequence replaces only the prompt by ``<cfg>``. Exported
    students record it in config.json (``mfmegatron_sequence_template``)."""
    system_prompt: str | None = None
    """HunyuanImage 3.0: a system prompt before the user's turn (either template; never replaced by
    ``<cfg>``). The official Instruct pipelines pick one of their system prompts per task; give
    the one the teacher is run with. Its tokens count in ``text_tokens``."""
    recompute: bool = False
    """Activation recompute of every block (the primal only; tangents are never recomputed). With
    TE layers in FP8 the recompute replays the first forward's FP8 scaling state (TE's
    activation-recompute context, as megatron's ``te_checkpoint``)."""
    use_transformer_engine: bool | None = None
    """The networks' linears: megatron's Transformer Engine layers (true), the local ones (false),
    or TE when it imports and CUDA is available (null). True without TE is an error."""
    fp8: Literal["off", "delayed", "tensorwise", "blockwise"] = "off"
    """FP8 GEMMs of the TE linears (primal only; tangents stay bf16, outside the FP8 autocast):
    delayed scaling (amax history), tensorwise (current per-tensor scaling) or blockwise (1x128
    activations, 128x128 weights; Hopper, CUDA >= 12.9). Needs TE and a GPU of compute capability
    >= 8.9 (blockwise: 9.0); checked before any network is built."""
    fp8_teacher_weights: bool = True
    """With ``fp8`` tensorwise or blockwise: the frozen teacher's TE weights become FP8 tensors
    once, after the student is initialised from the full-precision teacher (half the teacher's
    weight memory; tangents and bf16 GEMMs use them dequantized). Not with delayed scaling, whose
    weight scale would be the initial one (``mfmegatron/jvp/fp8.py``)."""
    vae_path: str | None = None
    """For ``meanflow.z_source=data``: the teacher's VAE, a diffusers ``AutoencoderKL`` folder
    (FLUX.1-dev's ``vae`` subfolder), which encodes the image shards' images to latents."""
    vae_latent: Literal["sample", "mean"] = "sample"
    """Which latent of the VAE encoder's Gaussian: a sample (as diffusers' FLUX pipelines, drawn
    from a generator seeded by (seed, step, data-parallel rank)) or its mean."""


@dataclass
class ParallelSection:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_parallel_size: int = 1
    """Mixture-of-experts families: ranks the routed experts are split over (each holds E / EP of
    every layer's experts; tokens travel to them by all-to-all)."""
    expert_tensor_parallel_size: int | None = None
    """Tensor-parallel size of each expert (None: ``tensor_parallel_size``, megatron's default)."""
    num_microbatches: int = 1
    """Micro-batches per step and data-parallel rank (pipeline parallel needs > 1 to overlap)."""
    use_distributed_optimizer: bool = False
    no_grad_memory_gb: float = 4.0
    """Activation memory a no-grad evaluation (teacher velocities, ODE steps, student rollouts,
    target JVPs) may use per rank. Its micro-batches hold as many rows as fit by the family's
    estimate of a no-grad forward's activation peak per sample (with a tangent: twice); nothing
    is kept for backward, so this is much larger than a training micro-batch."""


@dataclass
class DataSection:
    shards: str | None = None
    """Directory of prompt shards (``mfmegatron-build-prompt-shards``); with
    ``meanflow.z_source=data``, of image shards (``mfmegatron-build-image-shards``: prompt shards
    with an image per sample), whose images become the x of ``z_t = (1 - t) x + t ε``."""
    micro_batch_size: int = 1
    """Prompts per micro-batch and data-parallel rank."""
    window_shards: int | None = 16
    """Shuffle window in shards (None: shuffle the whole epoch)."""
    text_encoder: Literal["precomputed", "dummy", "hf"] = "precomputed"
    """Where embeddings come from: the shards, a deterministic dummy encoder (tests), or the HF
    T5/CLIP encoders at ``text_encoder_path`` (a FLUX pipeline folder)."""
    text_encoder_path: str | None = None
    text_tokenizer: str | None = None
    """One meaning per family. FLUX (``text_encoder=dummy`` only): a sentencepiece ``.model``
    whose ids the dummy encoder embeds (token row + position row, fixed pseudo-random) instead of
    hashed words — e.g. the shapes world's word tokenizer (``tools/build_shapes_data.py``).
    HunyuanImage 3.0 (required): the model's Hugging Face ``tokenizer.json``, with the official
    special tokens (``<boi>``, ``<eoi>``, ``<img>``, ``<timestep>``, ``<cfg>``, ``<guidance>``,
    ``<timestep_r>``, ``<img_size_*>``, ``<img_ratio_*>``, ``<pad>``); the model embeds the
    tokens itself, so ``text_encoder`` does not apply."""
    text_position_scale: float = 0.1
    """``text_encoder=dummy``: the weight of the dummy encoder's position row against its token
    row (unit-variance entries each). FLUX gives text tokens no RoPE position, so this row is all
    the network learns word order from ("a red circle above a blue square" against its swap);
    0.1 is faint. Embeddings precomputed into shards keep the scale they were built with."""
    text_context_scale: float = 0.0
    """``text_encoder=dummy``: the weight of the dummy encoder's neighbour rows (each token also
    carries fixed rows of the words before and after it, n-gram style), so that a word is bound
    to the words beside it ("a cyan triangle": "triangle" carries "cyan"). 0 (the default)
    leaves them out. A teacher is distilled with the settings it was trained with."""
    image_backend: Literal["auto", "pil", "dali"] = "auto"
    """``z_source=data``: image decoding with NVIDIA DALI (GPU decoding on CUDA machines), Pillow,
    or DALI when it is installed (``mfmegatron.data.images.build_image_loader``)."""
    image_crop: Literal["center", "random"] = "center"
    """``z_source=data``: images are resized to cover ``model.image_size`` (aspect kept), then
    cropped square at the centre or at a position seeded by (seed, sample)."""
    image_latents: Literal["vae", "precomputed"] = "vae"
    """``z_source=data``: encode each batch's images with the VAE at ``model.vae_path`` (on the
    fly), or read the latents ``build_image_shards --vae`` stored in the shards (no VAE and no
    image decoding in the loop; they are the posterior mean of a centre crop at the builder's
    ``--size``, which must equal ``model.image_size``; ``vae_latent`` and ``image_crop`` do not
    apply)."""


@dataclass
class WarmupSection:
    policy: Literal["fixed", "auto"] = "fixed"
    switch_step: int | None = 1000
    """fixed: the first differential step (0: differential from the start; None: never)."""
    auto: AutomaticWarmupConfig = field(default_factory=AutomaticWarmupConfig)


@dataclass
class AlignmentSection:
    enabled: bool = False
    config: AlignmentConfig = field(default_factory=AlignmentConfig)
    fake_lr: float = 1e-5
    fake_updates_per_step: int = 1
    fake_network: Literal["full", "lora"] = "full"
    """The fake network: a full trainable copy of the teacher, or LoRA on the teacher's own frozen
    weights (shared, not copied: no second model, no Adam state for 12B weights)."""
    lora_rank: int = 64
    lora_alpha: float = 64.0
    """LoRA update scale is lora_alpha / lora_rank."""


@dataclass
class OptimSection:
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """The schedule decays over ``train.steps``. On resume it is rebuilt from the recipe (only the
    step count comes from the checkpoint), so raising ``train.steps`` extends the decay."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    grad_reduce_in_fp32: bool = True
    """Gradient buffers (and their data-parallel reduction) in fp32; False halves their memory."""
    ema_decay: float = 0.999
    """EMA of the student's weights (0 disables it)."""
    ema_sharding: Literal["auto", "replicated", "data_parallel"] = "auto"
    """Where the EMA's float32 copy lives. ``data_parallel``: each data-parallel rank keeps the EMA
    of 1/DP of its parameters' rows (gathered one parameter at a time for export and sample grids);
    ``replicated``: every rank keeps all of it (4 bytes per local parameter, 12 GB per GPU for
    FLUX.1-dev at TP=4). ``auto``: ``data_parallel`` with ``parallel.use_distributed_optimizer``,
    which shards the optimizer's float32 state the same way, else ``replicated``. Checkpoints hold
    whole tensors either way: a run resumes with the other setting or at another layout."""


@dataclass
class TrainSection:
    steps: int = 1000
    seed: int = 1234
    output_dir: str = "outputs/run"
    save_interval: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    """Continue from ``output_dir/checkpoints/latest`` when it exists."""
    sample_interval: int = 0
    """Write a grid of student samples every N steps (0: never)."""
    sample_steps: tuple[int, ...] = (1, 2, 4)
    objective: Literal["meanflow_distillation", "flow_matching"] = "meanflow_distillation"
    """``flow_matching`` trains the teacher architecture itself from image shards
    (``meanflow.z_source=data``; ``model.teacher_checkpoint`` optional, to fine-tune) with the
    FLUX loss ``||v(z_t, t) - (ε - x)||²`` and ``meanflow.time_sampling``'s t: how the shapes
    world's teacher is made. Sample grids then show ``sample_steps``-step Euler samples."""
    eval_interval: int = 0
    """Evaluate the EMA student every N steps and after the last step (0: never), on
    ``eval_prompts`` (see ``mfmegatron/training/evaluation.py``): distances to the teacher's
    samples from the same noise, the ``eval_scorer``'s scores, a labelled grid in
    ``output_dir/eval/``; logged as ``eval_*`` to the JSONL log and TensorBoard."""
    eval_prompts: str | None = None
    """A text file of held-out prompts, one per line (the shapes world's ``heldout.txt``)."""
    eval_num_prompts: int = 32
    """The first N of ``eval_prompts`` (each sampler runs them as one batch)."""
    eval_student_steps: tuple[int, ...] = (1, 2, 4)
    eval_teacher_steps: tuple[int, ...] = (50, 2, 4)
    """Euler steps of the teacher's samplers; the most-step one is the reference of the distances."""
    eval_scorer: str = "none"
    """``shapes``: the shapes world's GenEval-style scorer (``models/shapes/scorer.py``)."""
    export_at_end: bool = True
    """Write the final EMA student as a diffusers folder (+ interval embedding) into output_dir."""


@dataclass
class LoggingSection:
    log_interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    log_prompts: bool = False
    """Record every step's prompt keys per data-parallel rank (``prompts/rank{r}.jsonl``), to
    audit what each replica saw across restarts."""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    meanflow: MeanFlowDistillationConfig = field(default_factory=MeanFlowDistillationConfig)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    alignment: AlignmentSection = field(default_factory=AlignmentSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
