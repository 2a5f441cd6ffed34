"""The warm-up switch: when the MeanFlow objective moves from the discrete to the differential
target.

The differential target contains `d/dt u_θ` of the student itself. Early in training that term
comes from an undertrained student and can drive training into collapse; the discrete target
(teacher ODE solution) has no student term. A switch object decides, step by step, which phase
the objective is in. The phase only ever moves forward: discrete -> differential.

Usage in a training loop (the objective does this for you)::

    phase = switch.advance(step, measure_gap)   # once per step, before the loss
    ...
    checkpoint["warmup"] = switch.state_dict()

`measure_gap` is a zero-argument callable returning the current self-consistency gap; it is
called only on the steps where a policy needs it (so it costs nothing on other steps).

Resuming (`load_state_dict`): the *recipe's* policy and settings apply from the resumed step on
(a user may lengthen the warm-up or change the threshold), starting from the checkpoint's
state: a run that had switched stays in the differential phase whatever the new settings say
(the phase never moves back), and an automatic policy resumed from an automatic checkpoint
keeps its gap EMA. A run still in the discrete phase continues under the recipe's policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

DISCRETE = "discrete"
DIFFERENTIAL = "differential"


class FixedStepWarmup:
    """Discrete target for steps `< switch_step`, differential from `switch_step` on.

    `switch_step=0` is "differential from step 0"; `switch_step=None` is "discrete forever".
    """

    def __init__(self, switch_step: int | None):
        if switch_step is not None and switch_step < 0:
            raise ValueError(f"switch_step must be >= 0 or None, got {switch_step}")
        self.switch_step = switch_step
        self.last_step = -1

    def phase_at(self, step: int) -> str:
        if self.switch_step is not None and step >= self.switch_step:
            return DIFFERENTIAL
        return DISCRETE

    def advance(self, step: int, measure_gap: Callable[[], float] | None = None) -> str:
        """The phase for training step `step` (this policy never measures the gap)."""
        self.last_step = step
        return self.phase_at(step)

    @property
    def phase(self) -> str:
        """The phase of the last step passed to `advance` (of step 0 before any)."""
        return self.phase_at(max(self.last_step, 0))

    def stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": "fixed", "switch_step": self.switch_step, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keeps this (the recipe's) `switch_step`, unless the checkpoint had already switched
        earlier: then it stays switched from that step."""
        switched_at = _switched_at(state)
        if switched_at is not None and (self.switch_step is None or switched_at < self.switch_step):
            self.switch_step = switched_at
        self.last_step = state["last_step"]


@dataclass
class AutomaticWarmupConfig:
    """Switch when the student's self-consistency gap is small enough.

    The gap, measured every `check_every` steps on the current training batch restricted to
    r < t, is the relative squared difference between the two targets at the same (z_t, r, t):
    `gap = Σ ||u_disc - u_diff||² / Σ ||u_disc||²`. The discrete target does not involve the
    student; the differential one is built from the student's own derivative. They agree only
    when the student's average-velocity field is self-consistent along the teacher's flow, i.e.
    when switching to the differential target no longer changes what the student is asked to fit.
    Because one batch is noisy, the decision uses an exponential moving average of the gap.

    The switch happens at the first check with `step >= min_steps` and `ema_gap < threshold`,
    or at `max_steps` whatever the gap (fallback). Note the gap has a floor: the discretisation
    error of the discrete target's ODE solver; pick the threshold above it (Heun with a few
    steps makes the floor small).
    """

    threshold: float = 0.1
    check_every: int = 25
    ema_decay: float = 0.5
    """Weight of the previous EMA value at each check (0 = use only the latest gap)."""
    min_steps: int = 0
    max_steps: int = 10_000


class AutomaticWarmup:
    """Discrete until the self-consistency gap criterion of `AutomaticWarmupConfig` holds."""

    def __init__(self, config: AutomaticWarmupConfig):
        if config.check_every < 1:
            raise ValueError("check_every must be >= 1")
        self.config = config
        self.current_phase = DISCRETE
        self.switch_step: int | None = None
        self.switch_reason: str | None = None
        self.ema_gap: float | None = None
        self.last_gap: float | None = None
        self.num_checks = 0
        self.last_step = -1

    def is_check_step(self, step: int) -> bool:
        return self.current_phase == DISCRETE and step % self.config.check_every == 0

    def advance(self, step: int, measure_gap: Callable[[], float] | None = None) -> str:
        """The phase for training step `step`; calls `measure_gap()` on check steps only."""
        self.last_step = step
        if self.current_phase == DIFFERENTIAL:
            return DIFFERENTIAL
        if self.is_check_step(step):
            if measure_gap is None:
                raise ValueError("the automatic warm-up needs measure_gap on check steps")
            gap = float(measure_gap())
            if math.isfinite(gap):
                self.last_gap = gap
                decay = self.config.ema_decay
                self.ema_gap = gap if self.ema_gap is None else decay * self.ema_gap + (1 - decay) * gap
                self.num_checks += 1
                if step >= self.config.min_steps and self.ema_gap < self.config.threshold:
                    self._switch(step, "gap_below_threshold")
        if self.current_phase == DISCRETE and step >= self.config.max_steps:
            self._switch(step, "max_steps")
        return self.current_phase

    def _switch(self, step: int, reason: str) -> None:
        self.current_phase = DIFFERENTIAL
        self.switch_step = step
        self.switch_reason = reason

    @property
    def phase(self) -> str:
        return self.current_phase

    def stats(self) -> dict[str, float]:
        out = {}
        if self.last_gap is not None:
            out["warmup_gap"] = self.last_gap
        if self.ema_gap is not None:
            out["warmup_gap_ema"] = self.ema_gap
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": "automatic",
            "config": asdict(self.config),
            "phase": self.current_phase,
            "switch_step": self.switch_step,
            "switch_reason": self.switch_reason,
            "ema_gap": self.ema_gap,
            "last_gap": self.last_gap,
            "num_checks": self.num_checks,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keeps this (the recipe's) config; restores the phase, and the gap statistics when the
        checkpoint's policy was automatic too."""
        self.last_step = state["last_step"]
        switched_at = _switched_at(state)
        if switched_at is not None:
            reason = state.get("switch_reason") or "fixed_step"
            self._switch(switched_at, reason)
        if state.get("policy") == "automatic":
            self.ema_gap = state["ema_gap"]
            self.last_gap = state["last_gap"]
            self.num_checks = state["num_checks"]


def _switched_at(state: dict[str, Any]) -> int | None:
    """The step at which a saved warm-up (either policy) had switched, None if it had not."""
    policy = state.get("policy")
    if policy == "automatic":
        return state["switch_step"] if state["phase"] == DIFFERENTIAL else None
    if policy == "fixed":
        switch_step, last_step = state["switch_step"], state["last_step"]
        return switch_step if switch_step is not None and last_step >= switch_step else None
    raise ValueError(f"unknown warm-up policy {policy!r} in the checkpoint")


WarmupSwitch = FixedStepWarmup | AutomaticWarmup
