"""The MeanFlow distillation trainer.

One step, on every rank of the job:

1. the data-parallel rank's prompt batch -> the family's conditioning (with
   ``meanflow.z_source=data``, also the batch's images -> latents x through the VAE); noise and
   times from a generator seeded by (seed, step, data-parallel rank), so a resumed run draws the
   same numbers;
2. ``MeanFlowDistillation.plan``: z_t from the teacher ODE (or ``(1 - t) x + t ε``), the warm-up
   phase, the targets (all no-grad, through ``NetworkRunner`` so pipeline stages stay in step);
3. the plan's training passes through megatron's schedules (gradients accumulate), then
   ``finalize_model_grads`` (data-parallel all-reduce, TP sums of replicated weights);
4. a non-finite loss or gradient skips the update (counted); otherwise the optimizer, the LR
   schedule and the EMA step; the alignment's fake network gets its own flow-matching update;
5. logging (rank 0: progress bar, JSONL, TensorBoard), sample grids, atomic checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mfmegatron.config import ConfigError, to_dict
from mfmegatron.data import (
    PromptBatchLoader,
    PromptShardReader,
    data_parallel_rank_and_size,
    gather_state_dict,
)
from mfmegatron.data.format import MANIFEST_NAME, Manifest
from mfmegatron.data.images import ImageBatchLoader, LatentBatchLoader, build_image_loader
from mfmegatron.jvp import fp8
from mfmegatron.meanflow import (
    DIFFERENTIAL,
    AutomaticWarmup,
    FixedStepWarmup,
    MeanFlowDistillation,
    TrajectoryAlignment,
    global_batch_time_pair,
)
from mfmegatron.parallel import ParallelConfig, initialize_parallel
from mfmegatron.sampling import sample_student
from mfmegatron.training import checkpoint as ckpt
from mfmegatron.training.config import TrainConfig
from mfmegatron.training.ema import ParameterEMA, resolve_sharding
from mfmegatron.training.evaluation import Evaluator, format_score_table
from mfmegatron.training.family import Networks, get_family
from mfmegatron.training.flow_matching import FLOW_MATCHING, FlowMatchingTraining
from mfmegatron.training.logger import TrainingLogger
from mfmegatron.training.runner import NetworkRunner, no_grad_max_rows
from mfmegatron.training.torch_adam import make_torch_adam_checkpointable


def optimizer_checkpoint_format() -> dict:
    """The distributed optimizer's checkpoint format (the plain optimizer ignores it: its state
    is always per parameter).

    "fully_reshardable" stores each parameter's Adam state whole, gathered over data-parallel
    ranks at save, so a run resumes at any TP/PP/DP layout; megatron's default
    ("fully_sharded_model_space") is deprecated and no longer saves in 0.19. Without CUDA the
    gather must go through megatron's gloo groups (its "memory-efficient" variant, which gathers
    on data-parallel rank 0 only); with CUDA it uses NCCL on every rank.
    """
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available(),
    }


def _frozen_parameter_names(module: torch.nn.Module) -> set[str]:
    return {name for name, param in module.named_parameters() if not param.requires_grad}


def _step_generator(seed: int, step: int, dp_rank: int, device) -> torch.Generator:
    # Every TP/PP rank of a data-parallel replica draws the same numbers; replicas differ.
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 4099 + dp_rank * 7919) % (2**63 - 1))
    return generator


def precision_problem(config: TrainConfig) -> str | None:
    """Why the recipe's ``model.fp8`` / ``model.use_transformer_engine`` cannot run here (one
    line), or None; checked before the process groups or any network exist."""
    model = config.model
    family = get_family(model.family)
    if (model.use_transformer_engine or model.fp8 != "off") and not getattr(family, "transformer_engine_spec", False):
        return (f"model.family={model.family} has no Transformer Engine layer spec yet: set "
                "model.use_transformer_engine=null and model.fp8=off")
    return fp8.precision_problem(model.fp8, model.use_transformer_engine)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        parallel = config.parallel
        problem = precision_problem(config)
        if problem is not None:
            raise ConfigError(problem)
        self.info = initialize_parallel(
            ParallelConfig(
                tensor_parallel_size=parallel.tensor_parallel_size,
                pipeline_parallel_size=parallel.pipeline_parallel_size,
                expert_parallel_size=parallel.expert_parallel_size,
                expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
                seed=config.train.seed,
            )
        )
        self.rank = dist.get_rank()
        self.device = self.info.device
        self.dtype = torch.bfloat16 if config.model.dtype == "bf16" else torch.float32
        self.output_dir = Path(config.train.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.family = get_family(config.model.family)
        self.dp_rank, self.dp_size = data_parallel_rank_and_size()
        self.expert_parallel = parallel.expert_parallel_size > 1
        # The text conditioning, the data (and, for z_source=data, the VAE) first: a recipe that
        # lacks what its prompts or its data source need fails in one line before any network
        # is built or loaded.
        self.text = self.family.text_conditioning(config, self.device, self.dtype)
        self.loader = self._data_loader()
        self.image_encoder = self._image_encoder()
        self.latent_stats: dict[str, float] = {}

        # Flow-matching training trains the teacher architecture itself; it takes the student's
        # place (optimizer, EMA, checkpoints, export) and there is no teacher to distil from.
        self.flow_matching = config.train.objective == FLOW_MATCHING
        if self.flow_matching:
            if config.meanflow.z_source != "data" or config.alignment.enabled:
                raise ValueError(
                    "train.objective=flow_matching trains on images: it needs meanflow.z_source=data "
                    "and alignment.enabled=false"
                )
            with_fake = False
            networks = Networks(teacher=None, student=self.family.build_flow_network(config, self.device))
        else:
            with_fake = config.alignment.enabled
            networks = self.family.build_networks(config, self.device, with_fake)
        self.teacher = networks.teacher.eval() if networks.teacher is not None else None
        self.student, self.optimizer = self._trained(networks.student, config.optim.lr)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if config.optim.lr_warmup_steps else config.optim.lr,
            max_lr=config.optim.lr,
            min_lr=config.optim.min_lr,
            lr_warmup_steps=config.optim.lr_warmup_steps,
            lr_decay_steps=max(config.train.steps, config.optim.lr_warmup_steps + 1),
            lr_decay_style=config.optim.lr_decay_style,
            start_wd=config.optim.weight_decay,
            end_wd=config.optim.weight_decay,
            wd_incr_steps=max(1, config.train.steps),
            wd_incr_style="constant",
            # The recipe's schedule, not the checkpoint's: a run extended to more steps decays
            # over the new total (megatron's default keeps the old one, so lr stays at min_lr).
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
        )
        self.ema = self._ema(networks.student)
        self.teacher_runner = self._runner(self.teacher) if self.teacher is not None else None
        self.student_runner = self._runner(self.student)
        self.fake, self.fake_optimizer, self.fake_runner, alignment = None, None, None, None
        if with_fake:
            self.fake, self.fake_optimizer = self._trained(networks.fake, config.alignment.fake_lr)
            self.fake_runner = self._runner(self.fake)
            alignment = TrajectoryAlignment(self.teacher_runner, self.fake_runner, config.alignment.config)
        meanflow = config.meanflow
        if with_fake and meanflow.align_weight <= 0:
            raise ValueError("alignment.enabled needs meanflow.align_weight > 0")
        if self.flow_matching:
            self.objective = FlowMatchingTraining()
        else:
            self.objective = MeanFlowDistillation(
                self.teacher_runner,
                self.student_runner,
                meanflow,
                self._warmup(),
                alignment if meanflow.align_weight > 0 else None,
                reduce_gap=self._average_gap_over_data_parallel,
                # Expert-parallel ranks belong to different data-parallel replicas and exchange
                # tokens inside every forward, so their network calls must match one for one:
                # the discrete target is solved on the whole batch (not only its r < t rows)
                # and the batch-dependent decisions are agreed over the job.
                select_condition=None if self.expert_parallel else self._select_condition,
                agree_max=self._max_over_job if self.expert_parallel else None,
            )

        self.evaluator = None
        if config.train.eval_interval > 0:
            if config.train.eval_prompts is None:
                raise ValueError("train.eval_interval needs train.eval_prompts: a file of held-out prompts")
            self.evaluator = Evaluator(self)
        self.counters = {"skipped_steps": 0, "skipped_fake_steps": 0}
        self.step = 0
        self.sample_inputs = None

    # -- construction -------------------------------------------------------------------------

    def _trained(self, module: torch.nn.Module, lr: float):
        config = module.config
        ddp = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=self.config.optim.grad_reduce_in_fp32,
                use_distributed_optimizer=self.config.parallel.use_distributed_optimizer,
            ),
            module=module,
        )
        optim = self.config.optim
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=self.config.parallel.use_distributed_optimizer,
            ),
            [ddp],
        )
        # Without TE/apex megatron uses torch's Adam, whose per-parameter step the distributed
        # optimizer's checkpointing cannot load as is (see torch_adam.py); with them, a no-op.
        make_torch_adam_checkpointable(optimizer)
        return ddp, optimizer

    def _runner(self, model) -> NetworkRunner:
        """A runner whose no-grad micro-batches fill ``parallel.no_grad_memory_gb`` of
        activations (the family's estimate per row), the training passes' micro-batches being
        ``parallel.num_microbatches``."""
        rows = no_grad_max_rows(self.config, self.family)
        return NetworkRunner(self.family, model, self.config.parallel.num_microbatches, *rows)

    def _select_condition(self, cond, index: torch.Tensor):
        return self.family.slice_condition(cond, index, None)

    def _ema(self, student: torch.nn.Module) -> ParameterEMA | None:
        optim = self.config.optim
        if optim.ema_decay <= 0:
            return None
        sharding = resolve_sharding(optim.ema_sharding, self.config.parallel.use_distributed_optimizer)
        if sharding != "data_parallel":
            return ParameterEMA(student, optim.ema_decay)
        return ParameterEMA(student, optim.ema_decay, group=parallel_state.get_data_parallel_group(),
                            expert_group=parallel_state.get_expert_data_parallel_group())

    def _warmup(self):
        warmup = self.config.warmup
        if warmup.policy == "fixed":
            return FixedStepWarmup(warmup.switch_step)
        return AutomaticWarmup(warmup.auto)

    def _average_gap_over_data_parallel(self, gap: float) -> float:
        finite = math.isfinite(gap)
        values = torch.tensor([gap if finite else 0.0, 1.0 if finite else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        return float(values[0] / values[1]) if values[1] > 0 else float("nan")

    def _max_over_job(self, value: int) -> int:
        values = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return int(values.item())

    def _data_loader(self) -> PromptBatchLoader:
        data = self.config.data
        if data.shards is None:
            raise ValueError("data.shards is not set: give a directory of prompt shards")
        if not Path(data.shards).is_dir():
            raise FileNotFoundError(f"data.shards directory {data.shards} does not exist")
        batch = data.micro_batch_size * self.config.parallel.num_microbatches
        if self.config.meanflow.z_source == "data":
            return self._image_loader(batch)
        reader = PromptShardReader(
            data.shards,
            rank=self.dp_rank,
            world_size=self.dp_size,
            seed=self.config.train.seed,
            window_shards=data.window_shards,
            load_embeddings=data.text_encoder == "precomputed",
        )
        return PromptBatchLoader(reader, batch, t5_seq_len=self.config.model.text_tokens)

    def _image_loader(self, batch_size: int) -> ImageBatchLoader:
        """z_source=data: image shards through the image loader (or their precomputed latents
        through the latent loader), in the prompt reader's resumable per-replica order (TP/PP
        peers of a replica read the same samples)."""
        data, model = self.config.data, self.config.model
        manifest = Path(data.shards) / MANIFEST_NAME
        fields = Manifest.read(manifest).fields if manifest.is_file() else None
        if fields is not None and "image" not in fields:
            raise ValueError(
                f"meanflow.z_source=data needs image shards in data.shards, but {data.shards} holds "
                "prompts only (build them with mfmegatron-build-image-shards)"
            )
        options = dict(
            rank=self.dp_rank, world_size=self.dp_size, seed=self.config.train.seed,
            window_shards=data.window_shards, load_embeddings=data.text_encoder == "precomputed",
            t5_seq_len=model.text_tokens,
        )  # fmt: skip
        if data.image_latents == "precomputed":
            stored = (fields or {}).get("latent")
            if stored is None:
                raise ValueError(
                    f"data.image_latents=precomputed, but the shards in {data.shards} hold no latents "
                    "(build them with mfmegatron-build-image-shards --vae PATH --size N)"
                )
            if stored["size"] != model.image_size:
                raise ValueError(
                    f"the latents in {data.shards} were encoded at {stored['size']} px, but "
                    f"model.image_size is {model.image_size}"
                )
            return LatentBatchLoader(data.shards, batch_size, **options)
        if model.latent_space == "vae" and model.vae_path is None:
            raise ValueError(
                "meanflow.z_source=data needs model.vae_path: the teacher's VAE (a diffusers "
                "AutoencoderKL folder, e.g. FLUX.1-dev's vae/)"
            )
        if model.latent_space == "vae" and not Path(model.vae_path).is_dir():
            raise FileNotFoundError(f"model.vae_path directory {model.vae_path} does not exist")
        return build_image_loader(
            data.shards, batch_size, size=model.image_size, backend=data.image_backend,
            device_id=torch.cuda.current_device() if torch.cuda.is_available() else None,
            crop=data.image_crop, **options,
        )  # fmt: skip

    def _image_encoder(self):
        """z_source=data with on-the-fly encoding: the family's VAE. Every rank loads it (small
        next to the networks: 84M parameters for FLUX.1), so a VAE that does not fit fails on
        every rank alike; only the first rank of each model-parallel group runs it
        (``_image_latents``)."""
        if self.config.meanflow.z_source != "data" or self.config.data.image_latents == "precomputed":
            return None
        return self.family.image_encoder(self.config, self.device, self.dtype)

    # -- checkpoints --------------------------------------------------------------------------

    def _module_sharded(self, ddp, prefix: str, trainable_only: bool = False) -> dict:
        """The module's sharded state; ``trainable_only``: without frozen parameters (a LoRA fake
        network's are the teacher's, which the checkpoint must not hold twice)."""
        sharded = ddp.module.sharded_state_dict()
        if trainable_only:
            frozen = _frozen_parameter_names(ddp.module)
            sharded = {key: value for key, value in sharded.items() if key not in frozen}
        replace_prefix_for_sharding(sharded, "", prefix)
        return sharded

    def sharded_state_dict(self, optimizers_with_state: set[str] | None = None) -> dict:
        """What a checkpoint holds. ``optimizers_with_state``: None to save (every optimizer that
        has state, i.e. has stepped), else the names to load (as recorded in the checkpoint).

        An optimizer that has never stepped (the fake network's, before alignment starts) has no
        state to save and is left out; megatron's optimizers fill it in themselves on load."""
        is_loading = optimizers_with_state is not None
        saved = optimizers_with_state if is_loading else self._optimizers_with_state()
        student = self._module_sharded(self.student, "student.")
        state = {"student": student, "state": self._common_state(saved)}
        if "optimizer" in saved:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                student, is_loading=is_loading, metadata=optimizer_checkpoint_format()
            )
        if self.ema is not None:
            state["ema"] = self.ema.sharded_state_dict(self.student.module.sharded_state_dict(), "ema.")
        if self.fake is not None:
            fake = self._module_sharded(self.fake, "fake.", trainable_only=True)
            state["fake"] = fake
            if "fake_optimizer" in saved:
                state["fake_optimizer"] = self.fake_optimizer.sharded_state_dict(
                    fake, is_loading=is_loading, metadata=optimizer_checkpoint_format()
                )
        return state

    def _optimizers_with_state(self) -> set[str]:
        names = set()
        for name, optimizer in (("optimizer", self.optimizer), ("fake_optimizer", self.fake_optimizer)):
            # A mixture-of-experts model's is chained (dense and expert parameters apart).
            inner = [] if optimizer is None else getattr(optimizer, "chained_optimizers", [optimizer])
            if any(any(part.optimizer.state.values()) for part in inner):
                names.add(name)
        return names

    def _common_state(self, optimizers_with_state: set[str]) -> dict:
        """Identical on every rank (dist_checkpointing stores it once)."""
        return {
            "step": self.step,
            "optimizers_with_state": sorted(optimizers_with_state),
            "seed": self.config.train.seed,
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "data": gather_state_dict(self.loader),
            "counters": dict(self.counters),
            "config": to_dict(self.config),
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.checkpoint_root, self.step, self.sharded_state_dict(), self.config.train.keep_checkpoints,
            files=self.family.checkpoint_files(self.student.module, self.ema is not None),
        )

    def resume(self, path: Path) -> None:
        common = ckpt.load_common_state(path)["state"]
        saved = set(common["optimizers_with_state"])
        distributed = common["config"]["parallel"].get("use_distributed_optimizer", False)
        if saved and distributed != self.config.parallel.use_distributed_optimizer:
            # The two keep Adam's state in different checkpoint layouts (megatron cannot convert).
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written with parallel.use_distributed_optimizer="
                f"{str(distributed).lower()}; resume it with the same setting"
            )
        loaded = ckpt.load_checkpoint(path, self.sharded_state_dict(optimizers_with_state=saved))
        self.student.module.load_state_dict(loaded["student"], strict=True)
        if "optimizer" in saved:
            self.optimizer.load_state_dict(loaded["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(loaded["ema"])
        if self.fake is not None:
            missing, unexpected = self.fake.module.load_state_dict(loaded["fake"], strict=False)
            frozen = _frozen_parameter_names(self.fake.module)
            if unexpected or not set(missing) <= frozen:
                raise ckpt.CheckpointError(
                    f"checkpoint {path}: the fake network does not match alignment.fake_network="
                    f"{self.config.alignment.fake_network!r} (missing {sorted(set(missing) - frozen)[:3]}, "
                    f"unexpected {sorted(unexpected)[:3]})"
                )
            if "fake_optimizer" in saved:
                self.fake_optimizer.load_state_dict(loaded["fake_optimizer"])
        state = loaded["state"]
        if state["seed"] != self.config.train.seed:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written with train.seed={state['seed']}, the recipe says "
                f"{self.config.train.seed}; resuming would change the run"
            )
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.loader.load_state_dict(state["data"])
        self.counters.update(state["counters"])

    # -- one step -----------------------------------------------------------------------------

    def _batch(self):
        batch = next(self.loader)
        if self.config.logging.log_prompts:
            self._record_prompts(batch.keys)
        x = self._image_latents(batch) if self.config.meanflow.z_source == "data" else None
        # Global sample indices key per-sample random conditioning (HunyuanImage 3.0's guidance
        # scale) like the time pairs: the same global sample gets the same draw at any DP size.
        cond = self.family.condition(batch, self.config, self.device, self.dtype, text=self.text,
                                     draw=(self.config.train.seed, self.step, self.dp_rank * len(batch)))
        return cond, len(batch), x

    def _image_latents(self, batch) -> torch.Tensor:
        """The x of ``z_t = (1 - t) x + t ε`` for this step's images. Latents stored in the
        shards are only packed (every peer read the same bytes). Otherwise the first rank of each
        model-parallel group encodes the images and broadcasts the latents to its TP/PP peers
        (which read the same images): the peers must see bit-identical inputs, and one VAE pass
        per replica and step is enough."""
        shape = (len(batch),) + tuple(self.family.latent_shape(self.config))
        source = parallel_state.get_model_parallel_src_rank()
        if batch.latents is not None:
            x = self.family.pack_latents(batch.latents.to(self.device)).to(self.dtype)
            if tuple(x.shape) != shape:
                raise ValueError(f"the stored latents pack to shape {tuple(x.shape)}; the model takes {shape}")
        elif self.rank == source:
            # Its own stream: the step generator's numbers are the flow noise and the times.
            generator = _step_generator(self.config.train.seed + 1, self.step, self.dp_rank, self.device)
            x = self.image_encoder(batch.images, generator).to(self.dtype)
            if tuple(x.shape) != shape:
                raise ValueError(f"the VAE made latents of shape {tuple(x.shape)}; the model takes {shape}")
        else:
            x = torch.empty(shape, dtype=self.dtype, device=self.device)
        if batch.latents is None:
            dist.broadcast(x, src=source, group=parallel_state.get_model_parallel_group())
        values = x.float()
        self.latent_stats = {"data_latent_mean": float(values.mean()), "data_latent_std": float(values.std())}
        return x

    def _record_prompts(self, keys: list[str]) -> None:
        # One writer per data-parallel replica: its first tensor- and pipeline-parallel rank.
        if parallel_state.get_tensor_model_parallel_rank() or parallel_state.get_pipeline_model_parallel_rank():
            return
        path = self.output_dir / "prompts" / f"rank{self.dp_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps({"step": self.step, "keys": keys}) + "\n")

    def _runners(self) -> dict[str, NetworkRunner]:
        runners = {"student": self.student_runner}
        if self.teacher_runner is not None:
            runners["teacher"] = self.teacher_runner
        if self.fake_runner is not None:
            runners["fake"] = self.fake_runner
        return runners

    def train_step(self) -> dict:
        config = self.config
        cond, batch_size, x = self._batch()
        generator = _step_generator(config.train.seed, self.step, self.dp_rank, self.device)
        shape = (batch_size,) + tuple(self.family.latent_shape(config))
        # The noise, the times and every ODE state stay float32; only the networks run in bf16.
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        times = global_batch_time_pair(
            config.meanflow.time_sampling, config.train.seed, self.step, batch_size * self.dp_size,
            slice(self.dp_rank * batch_size, (self.dp_rank + 1) * batch_size), self.device,
        )
        if self.sample_inputs is None:
            self.sample_inputs = (noise.clone(), cond)

        self.student.zero_grad_buffer()
        self.optimizer.zero_grad()
        for runner in self._runners().values():
            runner.sample_forwards = 0.0
        plan = self.objective.plan(self.step, noise, cond, x=x, generator=generator, times=times)
        stats = {**plan.stats, **self.family.condition_stats(cond)}
        total = 0.0
        for training_pass in plan.passes:
            loss, pass_stats = self.student_runner.run_pass(training_pass, cond)
            stats.update(pass_stats)
            total += training_pass.weight * loss
        stats["loss"] = total
        finalize_model_grads([self.student])
        update = self._guarded_step(self.optimizer, total, "skipped_steps")
        if not update["skipped"]:
            self.scheduler.step(increment=1)
            if self.ema is not None:
                self.ema.update()
        stats.update(update, lr=self.optimizer.param_groups[0]["lr"])
        if self.fake is not None and plan.alignment_samples is not None:
            stats.update(self._fake_updates(plan.alignment_samples, cond, generator))
        stats["phase"] = plan.phase
        # Numeric, so the data-parallel average shows a disagreement (anything but 0 or 1).
        stats["phase_differential"] = 1.0 if plan.phase == DIFFERENTIAL else 0.0
        # Network forwards per sample of this step (a JVP counts 2, a backward 2 more).
        for name, runner in self._runners().items():
            stats[f"forwards_{name}"] = runner.sample_forwards / batch_size
        stats["forward_equivalents"] = sum(runner.sample_forwards for runner in self._runners().values()) / batch_size
        self.step += 1
        return stats

    def _guarded_step(self, optimizer, loss: float, counter: str) -> dict:
        """One optimizer step, skipped on *every* rank when the loss or the gradient norm is not
        finite on *any* rank: a rank that skips while others step would hang the distributed
        optimizer's all-gather, or silently desynchronise the replicas without it, and an inf
        gradient that reaches Adam poisons its state for good. One flag, all-reduced over the
        whole job, decides."""
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
        finite = torch.tensor(
            [1.0 if math.isfinite(loss) and math.isfinite(grad_norm) else 0.0], device=self.device
        )
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 1.0:
            succeeded, _, _ = optimizer.step()
        else:
            succeeded = False
            optimizer.zero_grad()
        if not succeeded:
            self.counters[counter] += 1
        return {"grad_norm": grad_norm, "skipped": 0.0 if succeeded else 1.0}

    def _fake_updates(self, samples, cond, generator) -> dict:
        """The fake network's flow-matching updates on this step's alignment rollout (each
        update renoises it afresh)."""
        stats = {}
        for _ in range(self.config.alignment.fake_updates_per_step):
            self.fake.zero_grad_buffer()
            self.fake_optimizer.zero_grad()
            fake_pass = self.objective.fake_pass(samples, cond, generator)
            loss, pass_stats = self.fake_runner.run_pass(fake_pass, cond)
            finalize_model_grads([self.fake])
            update = self._guarded_step(self.fake_optimizer, loss, "skipped_fake_steps")
            stats = {**pass_stats, "fake_loss": loss, "fake_grad_norm": update["grad_norm"],
                     "fake_skipped": update["skipped"]}
        return stats

    # -- the loop -----------------------------------------------------------------------------

    def sample_grid(self) -> None:
        noise, cond = self.sample_inputs
        samples = {}
        for steps in self.config.train.sample_steps:
            samples[steps] = sample_student(self.student_runner, noise, cond, num_steps=steps)
        if self.rank == 0:
            path = self.output_dir / "samples" / f"step_{self.step:08d}.png"
            self.family.save_sample_grid(samples, path, self.config)

    def train(self) -> dict:
        config = self.config
        if self.rank == 0:
            removed = ckpt.remove_partial_saves(self.checkpoint_root)
            for name in removed:
                print(f"removed an interrupted checkpoint save: {name}", flush=True)
        dist.barrier()
        latest = ckpt.latest_checkpoint(self.checkpoint_root) if config.train.resume else None
        if latest is not None:
            self.resume(latest)
            if self.rank == 0:
                print(f"resumed from {latest} at step {self.step}", flush=True)
        logger = TrainingLogger(self.output_dir, config, is_main=self.rank == 0, start_step=self.step)
        flops_per_forward = self.family.flops_per_sample_forward(config)
        last = {}
        try:
            while self.step < config.train.steps:
                start = time.perf_counter()
                stats = self.train_step()
                seconds = time.perf_counter() - start
                samples = config.data.micro_batch_size * config.parallel.num_microbatches * self.dp_size
                stats["samples_per_second"] = samples / seconds
                stats["tflops_per_second"] = (
                    stats["forward_equivalents"] * flops_per_forward * samples / seconds / 1e12
                )
                stats = self._average_over_data_parallel(stats)
                stats.update({f"data_{k}": v for k, v in self.loader.counters.items()})
                stats.update(self.latent_stats)
                stats.update(self.counters)
                interval = config.train.eval_interval
                if self.evaluator is not None and (self.step % interval == 0 or self.step == config.train.steps):
                    stats.update(self.evaluator.evaluate(self.step))
                last = stats
                logger.log(self.step, stats)
                if config.train.sample_interval and self.step % config.train.sample_interval == 0:
                    self.sample_grid()
                if self.step % config.train.save_interval == 0 or self.step == config.train.steps:
                    self.save()
        finally:
            logger.close()
        if self.evaluator is not None and self.rank == 0 and any(k.startswith("eval_") for k in last):
            print(f"evaluation at step {self.step} on {len(self.evaluator.prompts)} held-out prompts:", flush=True)
            print(format_score_table(last, self.evaluator.scorer is not None), flush=True)
        if config.train.export_at_end and self.step == config.train.steps:
            self.export(self.output_dir / "student")
        return last

    def _average_over_data_parallel(self, stats: dict) -> dict:
        """Numeric stats averaged over data-parallel replicas (same keys on every rank)."""
        keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= self.dp_size
        return {**stats, **{k: float(v) for k, v in zip(keys, values.tolist())}}

    def export(self, directory: Path) -> None:
        """The (EMA) student as the family's user-facing format, written by rank 0.

        A run resumed and trained further exports again: the new folder is written beside the
        old one and replaces it only when complete, so an interrupted export loses nothing.
        """
        from contextlib import nullcontext

        partial = directory.with_name(directory.name + ".partial")
        if self.rank == 0 and partial.exists():
            shutil.rmtree(partial)
        dist.barrier()
        with self.ema.applied() if self.ema is not None else nullcontext():
            self.family.export_student(self.student.module, partial, self.config)
        if self.rank == 0:
            if directory.exists():
                shutil.rmtree(directory)
            partial.rename(directory)
        dist.barrier()


def run(config: TrainConfig) -> dict:
    trainer = Trainer(config)
    if trainer.rank == 0:
        Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.train.output_dir) / "config.json").write_text(json.dumps(to_dict(config), indent=2))
        print(f"parallel layout: {trainer.info.describe()}", flush=True)
    return trainer.train()

