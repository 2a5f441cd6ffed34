"""The warm-up switch from the discrete to the differential target."""

import json

import pytest
import torch

from mfmegatron.meanflow import (
    DIFFERENTIAL,
    DISCRETE,
    AutomaticWarmup,
    AutomaticWarmupConfig,
    FixedStepWarmup,
    MeanFlowDistillation,
    MeanFlowDistillationConfig,
)
from models.toy import ToyFlowConfig, ToyFlowTeacher, ToyMeanFlowStudent


def test_fixed_step_switches_exactly():
    switch = FixedStepWarmup(7)
    phases = [switch.advance(step) for step in range(12)]
    assert phases == [DISCRETE] * 7 + [DIFFERENTIAL] * 5
    assert [FixedStepWarmup(0).advance(s) for s in range(3)] == [DIFFERENTIAL] * 3
    assert [FixedStepWarmup(None).advance(s) for s in range(3)] == [DISCRETE] * 3


def run_automatic(switch, gaps, start=0, stop=None):
    """Drive the switch with a scripted gap per step; record phases and on which steps it asked."""
    phases, asked = [], []
    for step in range(start, stop if stop is not None else len(gaps)):
        def measure(step=step):
            asked.append(step)
            return gaps[step]
        phases.append(switch.advance(step, measure))
    return phases, asked


def test_automatic_switches_when_ema_crosses_threshold():
    config = AutomaticWarmupConfig(threshold=0.1, check_every=5, ema_decay=0.5, max_steps=1000)
    # Gap falls linearly: 1.0, 0.95, ...; EMA over checks at steps 0, 5, 10, ...
    gaps = [max(1.0 - 0.05 * s, 0.0) for s in range(40)]
    switch = AutomaticWarmup(config)
    phases, asked = run_automatic(switch, gaps)

    # Expected switch step, recomputed from the rule by hand.
    ema, expected = None, None
    for step in range(0, 40, 5):
        ema = gaps[step] if ema is None else 0.5 * ema + 0.5 * gaps[step]
        if ema < 0.1:
            expected = step
            break
    assert expected is not None
    assert switch.switch_step == expected and switch.switch_reason == "gap_below_threshold"
    assert phases == [DISCRETE] * expected + [DIFFERENTIAL] * (40 - expected)
    # measured only on check steps, and never after the switch
    assert asked == list(range(0, expected + 1, 5))


def test_automatic_respects_min_steps_and_max_steps_fallback():
    never_small = [1.0] * 30
    switch = AutomaticWarmup(AutomaticWarmupConfig(threshold=0.1, check_every=4, max_steps=13))
    phases, _ = run_automatic(switch, never_small)
    assert phases.index(DIFFERENTIAL) == 13 and switch.switch_reason == "max_steps"

    always_small = [0.0] * 30
    switch = AutomaticWarmup(AutomaticWarmupConfig(threshold=0.1, check_every=4, min_steps=9, max_steps=100))
    phases, _ = run_automatic(switch, always_small)
    assert phases.index(DIFFERENTIAL) == 12  # first check step >= min_steps


def test_automatic_state_dict_round_trip_resumes_identically():
    config = AutomaticWarmupConfig(threshold=0.2, check_every=3, ema_decay=0.7, max_steps=1000)
    gaps = [1.0 / (1 + 0.3 * s) for s in range(60)]
    reference = AutomaticWarmup(config)
    reference_phases, _ = run_automatic(reference, gaps)

    first = AutomaticWarmup(config)
    phases_before, _ = run_automatic(first, gaps, 0, 20)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a plain-JSON checkpoint
    resumed = AutomaticWarmup(config)
    resumed.load_state_dict(state)
    phases_after, _ = run_automatic(resumed, gaps, 20, 60)
    assert phases_before + phases_after == reference_phases
    assert resumed.state_dict() == reference.state_dict()


def test_a_resumed_warmup_follows_the_recipe_from_the_checkpoints_phase():
    gaps = [1.0 / (1 + 0.3 * s) for s in range(60)]
    config = AutomaticWarmupConfig(threshold=0.2, check_every=3, ema_decay=0.7, max_steps=1000)
    first = AutomaticWarmup(config)
    run_automatic(first, gaps, 0, 20)
    discrete_state = json.loads(json.dumps(first.state_dict()))
    assert first.phase == DISCRETE and first.ema_gap is not None

    # The recipe's threshold applies after the resume; the gap EMA carries over.
    stricter = AutomaticWarmup(AutomaticWarmupConfig(threshold=0.05, check_every=3, ema_decay=0.7, max_steps=1000))
    stricter.load_state_dict(discrete_state)
    assert stricter.ema_gap == first.ema_gap and stricter.config.threshold == 0.05
    phases, _ = run_automatic(stricter, gaps, 20, 60)
    assert DIFFERENTIAL not in phases  # 0.2 would have switched by now; 0.05 does not

    # A switched run stays switched, whatever the new settings say.
    run_automatic(first, gaps, 20, 60)
    switched_state = first.state_dict()
    assert first.phase == DIFFERENTIAL
    never = AutomaticWarmup(AutomaticWarmupConfig(threshold=0.0, max_steps=10_000))
    never.load_state_dict(switched_state)
    assert never.advance(60) == DIFFERENTIAL and never.switch_step == first.switch_step
    fixed_later = FixedStepWarmup(500)
    fixed_later.load_state_dict(switched_state)
    assert fixed_later.advance(60) == DIFFERENTIAL and fixed_later.switch_step == first.switch_step

    # A fixed warm-up lengthened on resume keeps training the discrete target; an automatic
    # policy takes over a fixed one that had not switched.
    fixed = FixedStepWarmup(10)
    fixed.advance(5)
    longer = FixedStepWarmup(30)
    longer.load_state_dict(fixed.state_dict())
    assert longer.advance(12) == DISCRETE and longer.advance(30) == DIFFERENTIAL
    automatic = AutomaticWarmup(config)
    automatic.load_state_dict(fixed.state_dict())
    assert automatic.phase == DISCRETE and automatic.ema_gap is None
    fixed.advance(10)
    automatic.load_state_dict(fixed.state_dict())
    assert automatic.phase == DIFFERENTIAL and automatic.switch_reason == "fixed_step"


def test_objective_follows_the_switch_and_measures_the_real_gap():
    torch.manual_seed(0)
    teacher = ToyFlowTeacher(ToyFlowConfig(width=16, depth=1)).requires_grad_(False)
    student = ToyMeanFlowStudent.from_teacher(teacher)
    switch = AutomaticWarmup(AutomaticWarmupConfig(threshold=1e9, check_every=2, min_steps=4))
    objective = MeanFlowDistillation(teacher, student, MeanFlowDistillationConfig(z_ode_steps=2), warmup=switch)
    phases = []
    for step in range(7):
        output = objective.generator_loss(step, torch.randn(32, 2), None, generator=torch.Generator().manual_seed(step))
        output.loss.backward()
        phases.append(output.phase)
        assert torch.isfinite(output.loss)
    assert phases == [DISCRETE] * 4 + [DIFFERENTIAL] * 3
    assert switch.last_gap is not None and switch.last_gap > 0
    assert objective.state_dict()["warmup"]["switch_step"] == 4
