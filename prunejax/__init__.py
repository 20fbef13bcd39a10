"""prunejax: pruning for JAX/NumPy pytrees, with models that really get smaller and faster.

The pipeline, one module per stage::

    masks -> optim/schedules (masked training) -> compact / sparse (execution) -> io / report
"""

from prunejax._tree import DenseLayer, dense_layers
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
from prunejax.models import mlp_apply

__version__ = "0.1.0"

__all__ = [
    "DenseLayer",
    "SparsityReport",
    "apply_masks",
    "block_masks",
    "combine",
    "dense_layers",
    "magnitude_masks",
    "mlp_apply",
    "nm_masks",
    "random_masks",
    "sparsity_report",
    "threshold_masks",
    "unit_masks",
]
