"""prunejax: pruning for JAX/NumPy pytrees, with models that really get smaller and faster.

The pipeline, one module per stage::

    masks  ->  optim / schedules / train  ->  compact / sparse  ->  io / report
    (which     (fine-tune with the masks      (drop dead units;     (small files;
     weights)   held fixed, or re-masked)      sparse kernels)       bytes, FLOPs)

Everything public is re-exported here; ``prunejax.keras`` (optional, needs Keras 3) is not.
"""

from prunejax._util import DenseLayer, dense_layers
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
from prunejax.data import batches, load_mnist
from prunejax.distributions import (
    custom_sparsity,
    erk_sparsity,
    global_magnitude_sparsity,
    pruned_counts,
    uniform_sparsity,
)
from prunejax.io import FileFormatError, load, load_header, save
from prunejax.lottery import LotteryRound, imp_step, lottery_ticket, random_reinit, rewind
from prunejax.masks import (
    SparsityReport,
    apply_masks,
    block_masks,
    combine,
    magnitude_masks,
    nm_masks,
    random_masks,
    sparsity_report,
    threshold_masks,
    unit_masks,
)
from prunejax.models import MLP, MaskableDense, mlp_apply
from prunejax.report import LayerSize, SizeReport, size_report
from prunejax.schedules import (
    constant_sparsity,
    iterative_sparsity,
    one_shot_sparsity,
    polynomial_sparsity,
)
from prunejax.sparse import densify, format_of, formats_of, predict_times, sparsify
from prunejax.train import (
    CheckpointError,
    evaluate,
    fit,
    gradual_pruning,
    iterative_pruning,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
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

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Compacted",
    "DenseLayer",
    "DSTState",
    "FileFormatError",
    "LayerSize",
    "LotteryRound",
    "MaskableDense",
    "MaskedState",
    "MLP",
    "MovementState",
    "PruningState",
    "SizeReport",
    "SparsityReport",
    "apply_masks",
    "batches",
    "block_masks",
    "combine",
    "compact",
    "compaction_plan",
    "constant_sparsity",
    "cosine_drop_fraction",
    "current_masks",
    "current_sparsity",
    "custom_sparsity",
    "dense_layers",
    "densify",
    "dst_masks",
    "dynamic_sparse",
    "erk_sparsity",
    "evaluate",
    "fit",
    "format_of",
    "formats_of",
    "global_magnitude_sparsity",
    "gradual_pruning",
    "imp_step",
    "iterative_pruning",
    "iterative_sparsity",
    "load",
    "load_checkpoint",
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
    "score_masks",
    "set_sparse",
    "size_report",
    "snip_masks",
    "snip_masks_from_batch",
    "snip_scores",
    "sparsify",
    "sparsity_report",
    "threshold_masks",
    "uniform_sparsity",
    "unit_masks",
]
