"""flaxlm.train: what changes weights — data pipeline, optimizer, steps, checkpoints, the loop."""

from flaxlm.model.sources import DataError, DocumentSource, default_corpus
from flaxlm.train.checkpoint import Checkpoints, export_hf, restore_model
from flaxlm.train.data import Batch, Encoder, eval_batches, split_documents, train_dataset
from flaxlm.train.finetune import export_finetuned, restore_finetuned
from flaxlm.train.loop import RunResult, TrainingDiverged, train
from flaxlm.train.metrics import flops_per_token, peak_flops
from flaxlm.train.optim import optimizer, schedule
from flaxlm.train.plot import plot_run
from flaxlm.train.recipe import Recipe
from flaxlm.train.step import LossSum, StepMetrics, TrainState, compile_steps, loss_sum, token_losses
from flaxlm.train.tokenizer_train import train_tokenizer

__all__ = [
    "Batch", "Checkpoints", "DataError", "DocumentSource", "Encoder", "LossSum", "Recipe",
    "RunResult", "StepMetrics", "TrainState", "TrainingDiverged", "compile_steps",
    "default_corpus", "eval_batches", "export_finetuned", "export_hf",
    "flops_per_token", "loss_sum", "optimizer", "peak_flops", "plot_run", "restore_finetuned",
    "restore_model", "schedule", "split_documents", "token_losses", "train", "train_dataset",
    "train_tokenizer",
]
