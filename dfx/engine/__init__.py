"""The engine: one training loop, evaluation, checkpoints and run directories for every task."""

from dfx.engine.evaluation import evaluate_checkpoint, load_model
from dfx.engine.trainer import evaluate, train

__all__ = ["evaluate", "evaluate_checkpoint", "load_model", "train"]
