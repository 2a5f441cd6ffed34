"""What a training run shows and records (rank 0): a progress bar with ETA, a JSONL log and
TensorBoard event files under ``output_dir``."""

from __future__ import annotations

import json
import time
from pathlib import Path

# Shown on the progress bar (when present), in this order.
_BAR_KEYS = ("phase", "loss", "grad_norm", "samples_per_second", "tflops_per_second")


class TrainingLogger:
    def __init__(self, output_dir: Path, config, is_main: bool, start_step: int):
        self.is_main = is_main
        self.interval = max(1, config.logging.log_interval)
        self.bar = None
        self.jsonl = None
        self.tensorboard = None
        if not is_main:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "log.jsonl", "a", buffering=1)
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if config.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=config.train.steps, initial=start_step, desc="distill", unit="step", dynamic_ncols=True)

    def log(self, step: int, stats: dict) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(1)
        # Evaluation steps are always recorded, whatever the logging interval.
        if step % self.interval and not any(key.startswith("eval_") for key in stats):
            return
        record = {"step": step, "time": time.time(), **stats}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in stats.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.set_postfix({k: _short(stats[k]) for k in _BAR_KEYS if k in stats})
        elif step % self.interval == 0:
            parts = " ".join(f"{k}={_short(stats[k])}" for k in _BAR_KEYS if k in stats)
            print(f"step {step}: {parts}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _short(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return value
