"""LeNet-300-100 on MNIST with prunejax: the application behind ``prunejax mnist``.

One concept per module:

* :mod:`~prunejax.apps.mnist.data` — MNIST via ``tfds.data_source`` (offline, cached), the
  validation split (the last 10,000 training images), batches.
* :mod:`~prunejax.apps.mnist.augment` — random translations, on the host and inside ``jit``.
* :mod:`~prunejax.apps.mnist.optimizer` — Adam(W) with a decaying learning rate.
* :mod:`~prunejax.apps.mnist.train` — the train step, :func:`fit` (host loop with checkpoints
  and exact resume, data-parallel) and :func:`fit_scan` (whole epochs in one ``lax.scan``).
* :mod:`~prunejax.apps.mnist.checkpoint` — atomic, checked checkpoints.
* :mod:`~prunejax.apps.mnist.recipe` — iterative (Han et al. 2015) and gradual (Zhu & Gupta
  2017) pruning drivers, Han's per-layer budgets and mask rules.
* :mod:`~prunejax.apps.mnist.plots` — the error-vs-density and error-vs-file-size plots.
* :mod:`~prunejax.apps.mnist.compress` — ``prunejax compress``: Deep Compression (Han, Mao &
  Dally 2016) of LeNet-300-100, every setting chosen on the validation split.
* :mod:`~prunejax.apps.mnist.cli` — the ``prunejax mnist`` and ``prunejax compress`` command
  lines.
"""

from prunejax.apps.mnist.augment import random_shift, shift_images
from prunejax.apps.mnist.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from prunejax.apps.mnist.data import (
    MNIST,
    MNIST_TRAIN_LABEL_COUNTS,
    VALIDATION_SIZE,
    batch_indices,
    batches,
    epoch_order,
    find_data_dir,
    load_mnist,
    num_batches,
    split_validation,
)
from prunejax.apps.mnist.optimizer import make_optimizer
from prunejax.apps.mnist.recipe import (
    RoundResult,
    gradual_pruning,
    iterative_pruning,
    layer_densities,
    mask_builder,
)
from prunejax.apps.mnist.train import (
    ClassifierLoss,
    FitResult,
    TrainConfig,
    classifier_loss,
    data_mesh,
    evaluate,
    fit,
    fit_scan,
    kernel_density,
    make_train_step,
    scan_epoch,
    train_step,
)

__all__ = [
    "MNIST",
    "MNIST_TRAIN_LABEL_COUNTS",
    "CheckpointError",
    "ClassifierLoss",
    "FitResult",
    "RoundResult",
    "TrainConfig",
    "VALIDATION_SIZE",
    "batch_indices",
    "batches",
    "classifier_loss",
    "data_mesh",
    "epoch_order",
    "evaluate",
    "find_data_dir",
    "fit",
    "fit_scan",
    "gradual_pruning",
    "iterative_pruning",
    "kernel_density",
    "layer_densities",
    "load_checkpoint",
    "load_mnist",
    "make_optimizer",
    "make_train_step",
    "mask_builder",
    "num_batches",
    "random_shift",
    "restore_checkpoint",
    "save_checkpoint",
    "scan_epoch",
    "shift_images",
    "split_validation",
    "train_step",
]
