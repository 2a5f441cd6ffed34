"""Model-agnostic MeanFlow distillation objectives (arXiv 2605.17834; see METHOD.md)."""

from mfmegatron.meanflow.interface import (
    ClassifierFreeGuidanceTeacher,
    FlowTeacher,
    MeanFlowStudent,
    broadcast_time,
    clean_estimate,
    guided_velocity,
)
from mfmegatron.meanflow.time_sampling import (
    TimeSamplerConfig,
    global_batch_time_pair,
    sample_logit_normal,
    sample_time_pair,
)
from mfmegatron.meanflow.loss import AdaptiveLossConfig, AdaptiveLossOutput, adaptive_weighted_loss
from mfmegatron.meanflow.targets import (
    DiscreteTargetConfig,
    ResidualNormalizationConfig,
    TargetOutput,
    differential_target,
    differential_target_from_jvp,
    discrete_step_counts,
    discrete_target,
    meanflow_tangents,
    normalize_residual,
    relative_target_gap,
)
from mfmegatron.meanflow.warmup import (
    DIFFERENTIAL,
    DISCRETE,
    AutomaticWarmup,
    AutomaticWarmupConfig,
    FixedStepWarmup,
    WarmupSwitch,
)
from mfmegatron.meanflow.alignment import AlignmentConfig, AlignmentOutput, TrajectoryAlignment
from mfmegatron.meanflow.objective import (
    DistillationStepOutput,
    MeanFlowDistillation,
    MeanFlowDistillationConfig,
    StepPlan,
)
from mfmegatron.meanflow.passes import TrainingPass, run_pass, slice_rows

__all__ = [
    "FlowTeacher",
    "MeanFlowStudent",
    "ClassifierFreeGuidanceTeacher",
    "guided_velocity",
    "broadcast_time",
    "clean_estimate",
    "TimeSamplerConfig",
    "sample_logit_normal",
    "sample_time_pair",
    "global_batch_time_pair",
    "AdaptiveLossConfig",
    "AdaptiveLossOutput",
    "adaptive_weighted_loss",
    "DiscreteTargetConfig",
    "ResidualNormalizationConfig",
    "TargetOutput",
    "discrete_target",
    "discrete_step_counts",
    "differential_target",
    "differential_target_from_jvp",
    "meanflow_tangents",
    "normalize_residual",
    "relative_target_gap",
    "DISCRETE",
    "DIFFERENTIAL",
    "FixedStepWarmup",
    "AutomaticWarmup",
    "AutomaticWarmupConfig",
    "WarmupSwitch",
    "AlignmentConfig",
    "AlignmentOutput",
    "TrajectoryAlignment",
    "MeanFlowDistillation",
    "MeanFlowDistillationConfig",
    "DistillationStepOutput",
    "StepPlan",
    "TrainingPass",
    "run_pass",
    "slice_rows",
]
