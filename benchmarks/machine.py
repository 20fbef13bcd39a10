"""The machine a run measured: CPU model, ISA path, cores, load, library versions, date."""

from __future__ import annotations

import datetime as _dt
import os
import platform

import jax
import jaxlib
import numpy as np


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def kernel_isa() -> dict:
    """The vector path of prunejax's compiled kernels in this process, and what was asked for.

    Returns:
      ``{"isa": "avx512" | "avx2" | ... | None (no compiled kernels), "isa_requested":
      $PRUNEJAX_ISA or "native", "cpu_isas": the paths this CPU executes}``.
    """
    from prunejax.sparse import ffi

    paths = ffi.supported_isas()
    return {
        "isa": ffi.isa(),
        "isa_requested": os.environ.get("PRUNEJAX_ISA", "") or "native",
        "cpu_isas": [name for name, why in paths.items() if why is None and name != "native"],
    }


def loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, where the OS has them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    """Host, platform, CPU, cores, versions, backend, devices, date and load at the start.

    Returns:
      A JSON-ready dict (the ``info`` of ``results.json``).
    """
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", "?"),
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()],
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": loadavg(),
        "bcoo_cusparse_lowering": bool(getattr(jax.config, "jax_bcoo_cusparse_lowering", False)),
        **kernel_isa(),
    }
    try:
        import scipy

        info["scipy"] = scipy.__version__
    except ModuleNotFoundError:
        info["scipy"] = None
    return info
