"""prunejax: pruning for JAX/NumPy pytrees, with models that really get smaller and faster."""

from prunejax.models import mlp_apply

__version__ = "0.1.0"

__all__ = ["mlp_apply"]
