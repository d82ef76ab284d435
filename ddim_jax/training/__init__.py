"""Data-parallel training, by concern: ``run`` (a config resolved once into a run's parts, and its run
record), ``state`` (train state, optimizer, step), ``checkpoints`` (orbax checkpoints and resuming),
``metrics`` (jsonl, TensorBoard, progress) and ``loop`` (``train``)."""

from ddim_jax.training.checkpoints import Checkpointer, load_checkpoint, load_params
from ddim_jax.training.loop import TrainResult, train
from ddim_jax.training.run import Run, resolve
from ddim_jax.training.state import TrainState, abstract_state, init_state, make_optimizer, make_train_step

__all__ = ["Checkpointer", "Run", "TrainResult", "TrainState", "abstract_state", "init_state", "load_checkpoint",
           "load_params", "make_optimizer", "make_train_step", "resolve", "train"]
