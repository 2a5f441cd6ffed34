"""Evaluation during training: the EMA student on a fixed held-out prompt set.

Every ``train.eval_interval`` steps (and after the last step) the trainer calls
``Evaluator.evaluate``:

- the EMA student samples the ``train.eval_prompts`` set at each of ``train.eval_student_steps``
  (1/2/4 by default) from fixed noise;
- the teacher samples the same prompts from the same noise with ``train.eval_teacher_steps`` Euler
  steps (50/2/4 by default; computed once: the teacher is frozen). In flow-matching training the
  network being trained is the teacher: its EMA is sampled at the teacher step counts, every time;
- every sample set is compared with the teacher's most-step samples (``sample_distance``: paired
  RMSE and a pooled-image MMD, on decoded images when the family decodes, else on latents), and
  scored by ``train.eval_scorer`` when one is set (the shapes world's GenEval-style scorer);
- a labelled grid (a column per prompt, a row per sampler) goes to ``output_dir/eval/`` when the
  family decodes its latents to images.

Every model-parallel rank runs the samplers (the networks are split over them); every
data-parallel replica evaluates the same prompts (small sets: a few dozen), rank 0 writes.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from pathlib import Path

import torch

from mfmegatron.data import PromptBatch
from mfmegatron.sampling import sample_student
from mfmegatron.sampling.ode import sample_teacher
from mfmegatron.metrics import sample_distance

# name -> "module:function"; function(prompts: list[str], images [n, 3, H, W] in [0, 1]) -> scores
SCORERS = {"shapes": "models.shapes.scorer:score_captions"}


def get_scorer(name: str):
    if name not in SCORERS:
        raise ValueError(f"unknown train.eval_scorer {name!r}; known: none, {', '.join(SCORERS)}")
    module, function = SCORERS[name].split(":")
    return getattr(importlib.import_module(module), function)


def read_prompts(path: str | Path, count: int) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"train.eval_prompts {path} holds no prompts")
    return lines[:count]


class Evaluator:
    def __init__(self, trainer):
        config = trainer.config
        train = config.train
        self.trainer = trainer
        self.prompts = read_prompts(train.eval_prompts, train.eval_num_prompts)
        batch = PromptBatch(keys=[f"eval{i}" for i in range(len(self.prompts))], prompts=self.prompts,
                            meta=[None] * len(self.prompts), shards=[""] * len(self.prompts),
                            epochs=[0] * len(self.prompts), positions=list(range(len(self.prompts))))  # fmt: skip
        # No draw: per-sample random conditioning takes its fixed evaluation value.
        self.cond = trainer.family.condition(batch, config, trainer.device, trainer.dtype, text=trainer.text)
        generator = torch.Generator().manual_seed(train.seed + 7)
        shape = (len(self.prompts),) + tuple(trainer.family.latent_shape(config))
        self.noise = torch.randn(shape, generator=generator).to(trainer.device)
        self.scorer = get_scorer(train.eval_scorer) if train.eval_scorer != "none" else None
        self.teacher_samples: dict[str, torch.Tensor] | None = None

    def _teacher_samples(self) -> dict[str, torch.Tensor]:
        trainer, steps = self.trainer, self.trainer.config.train.eval_teacher_steps
        if trainer.flow_matching:  # the trained network is the teacher: its EMA, now
            with trainer.ema.applied() if trainer.ema is not None else nullcontext():
                return {f"teacher_{k}": self._decode(sample_teacher(trainer.student_runner, self.noise, self.cond, k))
                        for k in steps}  # fmt: skip
        if self.teacher_samples is None:
            self.teacher_samples = {
                f"teacher_{k}": self._decode(sample_teacher(trainer.teacher_runner, self.noise, self.cond, k))
                for k in steps
            }
        return self.teacher_samples

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        trainer = self.trainer
        images = trainer.family.decode_images(latents, trainer.config)
        return (images if images is not None else latents).float().cpu()

    def evaluate(self, step: int) -> dict[str, float]:
        trainer, train = self.trainer, self.trainer.config.train
        samples = dict(self._teacher_samples())
        if not trainer.flow_matching:
            with trainer.ema.applied() if trainer.ema is not None else nullcontext():
                for k in train.eval_student_steps:
                    samples[f"student_{k}"] = self._decode(sample_student(trainer.student_runner, self.noise, self.cond, k))
        reference_name = f"teacher_{max(train.eval_teacher_steps)}"
        reference = samples[reference_name]
        stats = {}
        for name, images in samples.items():
            if name != reference_name:
                for metric, value in sample_distance(images, reference).items():
                    stats[f"eval_{name}_{metric}"] = value
            if self.scorer is not None and images.dim() == 4 and images.shape[1] == 3:
                for metric, value in self.scorer(self.prompts, images).items():
                    stats[f"eval_{name}_{metric}"] = float(value)
        # Latents without a decoder have no picture here (the family's sample grids show them).
        if trainer.rank == 0 and reference.dim() == 4 and reference.shape[1] == 3:
            save_labelled_grid(samples, self.prompts, trainer.output_dir / "eval" / f"step_{step:08d}.png")
        return stats


def save_labelled_grid(samples: dict[str, torch.Tensor], prompts: list[str], path: Path,
                       columns: int = 8) -> None:
    """A row per sampler (its name on the left), a column per prompt (its text on top), for the
    first ``columns`` prompts; images [n, 3, H, W] in [0, 1]."""
    from PIL import Image, ImageDraw

    n = min(columns, len(prompts))
    cell, label_width, label_height = 96, 96, 36
    canvas = Image.new("RGB", (label_width + n * cell, label_height + len(samples) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for column, prompt in enumerate(prompts[:n]):
        words, lines = prompt.split(), [""]
        for word in words:  # wrap to the cell width (about 15 characters of the default font)
            if len(lines[-1]) + len(word) + 1 > 15:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        draw.text((label_width + column * cell + 2, 1), "\n".join(lines[:3]), fill="black")
    for row, (name, images) in enumerate(samples.items()):
        draw.text((2, label_height + row * cell + cell // 2 - 6), name.replace("_", " ") + " steps", fill="black")
        for column in range(n):
            image = images[column].float()
            array = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(array).resize((cell - 4, cell - 4), Image.NEAREST)
            canvas.paste(tile, (label_width + column * cell + 2, label_height + row * cell + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def format_score_table(stats: dict[str, float], scorer: bool) -> str:
    """The final evaluation as a table: a row per sampler, the scores (or distances) as columns."""
    names = sorted({key.split("_")[1] + "_" + key.split("_")[2] for key in stats if key.startswith("eval_")},
                   key=lambda name: (name.startswith("student"), -int(name.split("_")[1])))  # fmt: skip
    metrics = ["overall", "colour", "shape", "count", "position"] if scorer else []
    metrics += ["paired_rmse", "mmd"]
    header = f"{'sampler':<14}" + "".join(f"{m:>12}" for m in metrics)
    rows = [header, "-" * len(header)]
    for name in names:
        cells = []
        for metric in metrics:
            value = stats.get(f"eval_{name}_{metric}")
            cells.append(f"{value:>12.3f}" if value is not None else f"{'-':>12}")
        rows.append(f"{name.replace('_', ' ') + ' steps':<14}" + "".join(cells))
    return "\n".join(rows)


__all__ = ["Evaluator", "SCORERS", "get_scorer", "save_labelled_grid", "format_score_table"]
