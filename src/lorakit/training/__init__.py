"""Fine-tuning runs: deterministic batches, Accelerate loop, pickle-free checkpoints, evaluation."""

from .loop import TrainingDiverged, train
from .run_config import TrainConfig

__all__ = ["TrainConfig", "TrainingDiverged", "train"]
