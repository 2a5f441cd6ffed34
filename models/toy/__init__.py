"""2-D toy flow teacher / MeanFlow student, target distributions and metrics."""

from models.toy.data import TOY_TARGETS, Checkerboard, RingOfGaussians
from models.toy.metrics import mmd_rbf, sliced_wasserstein
from models.toy.model import ToyFlowConfig, ToyFlowTeacher, ToyMeanFlowStudent

__all__ = [
    "ToyFlowConfig",
    "ToyFlowTeacher",
    "ToyMeanFlowStudent",
    "RingOfGaussians",
    "Checkerboard",
    "TOY_TARGETS",
    "sliced_wasserstein",
    "mmd_rbf",
]
