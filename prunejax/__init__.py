"""prunejax: pruning for JAX/NumPy pytrees, with models that really get smaller and faster.

The pipeline, one module (or subpackage) per stage (docs/ARCHITECTURE.md)::

    masks  ->  transforms / schedules  ->  compact / sparse  ->  fileformat / report
    (which     (fine-tune with the masks   (drop dead units;     (small files;
     weights)   held fixed, or re-masked)   sparse kernels)       bytes, FLOPs)

The core's API is re-exported here; the kernel classes, tuning and GPU helpers stay in
``prunejax.sparse``, the file-format constants in ``prunejax.fileformat``.  The MNIST
application's names (``fit`` and its ``TrainConfig``, ``evaluate``, ``load_mnist``, the pruning
recipes, checkpoints) live in ``prunejax.apps.mnist`` and are resolved on first use, so
``import prunejax`` loads neither TFDS, tqdm nor matplotlib (``from prunejax import *`` does, as
it takes every name of ``__all__``).  ``prunejax.keras`` (optional, needs Keras 3) is not
re-exported.
"""

from __future__ import annotations

import importlib
from typing import Any

from prunejax._util import DenseLayer, dense_layers
from prunejax._version import __version__ as __version__
from prunejax.compact import Compacted, compact, compaction_plan
from prunejax.criteria import (
    MovementState,
    movement,
    movement_masks,
    movement_scores,
    score_masks,
    snip_masks,
    snip_masks_from_batch,
    snip_scores,
)
from prunejax.distributions import (
    custom_sparsity,
    erk_sparsity,
    global_magnitude_sparsity,
    pruned_counts,
    uniform_sparsity,
)
from prunejax.fileformat import FileFormatError, load, load_header, save
from prunejax.graph import GraphCompacted, UnitGroup, compact_graph
from prunejax.lottery import LotteryRound, imp_step, lottery_ticket, random_reinit, rewind
from prunejax.masks import (
    SparsityReport,
    apply_masks,
    block_masks,
    combine,
    magnitude_masks,
    nm_masks,
    place_like,
    random_masks,
    sparsity_report,
    threshold_masks,
    unit_masks,
)
from prunejax.models import MLP, MaskableDense, mlp_apply
from prunejax.quantize import (
    Quantized,
    codebook_grads,
    codebooks,
    dequantize,
    kmeans_quantize,
    uniform_quantize,
    with_codebooks,
)
from prunejax.report import LayerSize, SizeReport, conv_spatial, size_report
from prunejax.schedules import (
    constant_sparsity,
    iterative_sparsity,
    one_shot_sparsity,
    polynomial_sparsity,
)
from prunejax.selection import keep_lowest
from prunejax.sharded import load_sharded, save_sharded
from prunejax.sparse import (
    densify,
    export_tuning,
    format_of,
    formats_of,
    import_tuning,
    predict_times,
    sparse_apply,
    sparsify,
)
from prunejax.transforms import (
    DSTState,
    MaskedState,
    PruningState,
    cosine_drop_fraction,
    current_masks,
    current_sparsity,
    dst_masks,
    dynamic_sparse,
    mask_state,
    masked,
    pruning,
    rigl,
    set_sparse,
)

# The MNIST application, imported on first use: name -> module that defines it.
_APP = {
    "CheckpointError": "prunejax.apps.mnist.checkpoint",
    "load_checkpoint": "prunejax.apps.mnist.checkpoint",
    "restore_checkpoint": "prunejax.apps.mnist.checkpoint",
    "save_checkpoint": "prunejax.apps.mnist.checkpoint",
    "batches": "prunejax.apps.mnist.data",
    "load_mnist": "prunejax.apps.mnist.data",
    "gradual_pruning": "prunejax.apps.mnist.recipe",
    "iterative_pruning": "prunejax.apps.mnist.recipe",
    "evaluate": "prunejax.apps.mnist.train",
    "fit": "prunejax.apps.mnist.train",
    "FitResult": "prunejax.apps.mnist.train",
    "TrainConfig": "prunejax.apps.mnist.train",
    "RoundResult": "prunejax.apps.mnist.recipe",
}


def __getattr__(name: str) -> Any:
    """Resolve the application's names lazily (PEP 562)."""
    module = _APP.get(name)
    if module is None:
        raise AttributeError(f"module 'prunejax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_APP))


__all__ = [
    "CheckpointError",
    "Compacted",
    "DenseLayer",
    "DSTState",
    "FitResult",
    "FileFormatError",
    "GraphCompacted",
    "LayerSize",
    "LotteryRound",
    "MaskableDense",
    "MaskedState",
    "MLP",
    "MovementState",
    "PruningState",
    "Quantized",
    "RoundResult",
    "SizeReport",
    "SparsityReport",
    "TrainConfig",
    "UnitGroup",
    "apply_masks",
    "batches",
    "block_masks",
    "codebook_grads",
    "codebooks",
    "combine",
    "compact",
    "compact_graph",
    "compaction_plan",
    "conv_spatial",
    "constant_sparsity",
    "cosine_drop_fraction",
    "current_masks",
    "current_sparsity",
    "custom_sparsity",
    "dense_layers",
    "densify",
    "dequantize",
    "dst_masks",
    "dynamic_sparse",
    "erk_sparsity",
    "evaluate",
    "export_tuning",
    "fit",
    "format_of",
    "formats_of",
    "global_magnitude_sparsity",
    "gradual_pruning",
    "imp_step",
    "import_tuning",
    "iterative_pruning",
    "iterative_sparsity",
    "keep_lowest",
    "kmeans_quantize",
    "load",
    "load_checkpoint",
    "load_sharded",
    "load_header",
    "load_mnist",
    "lottery_ticket",
    "magnitude_masks",
    "mask_state",
    "masked",
    "mlp_apply",
    "movement",
    "movement_masks",
    "movement_scores",
    "nm_masks",
    "one_shot_sparsity",
    "place_like",
    "polynomial_sparsity",
    "predict_times",
    "pruned_counts",
    "pruning",
    "random_masks",
    "random_reinit",
    "restore_checkpoint",
    "rewind",
    "rigl",
    "save",
    "save_checkpoint",
    "save_sharded",
    "score_masks",
    "set_sparse",
    "size_report",
    "snip_masks",
    "snip_masks_from_batch",
    "snip_scores",
    "sparse_apply",
    "sparsify",
    "sparsity_report",
    "threshold_masks",
    "uniform_quantize",
    "uniform_sparsity",
    "unit_masks",
    "with_codebooks",
]
