"""Mask builders on parameters sharded over an explicit mesh, called outside ``jax.set_mesh``.

``jax.make_mesh`` gives explicit axes; a builder must then name the mesh itself (a bare
``PartitionSpec`` is refused by JAX outside a mesh context).  The check runs in a subprocess
on 4 forced CPU devices (the device count is fixed when JAX starts).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

SCRIPT = r"""
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import prunejax as pj

mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
rng = np.random.default_rng(0)
w = rng.normal(size=(8, 16)).astype(np.float32)
v = rng.normal(size=(16, 8)).astype(np.float32)
b = np.zeros(16, np.float32)
put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
tree = {"a": {"kernel": put(w, P(None, "x")), "bias": put(b, P("x"))},
        "b": {"kernel": put(v, P("x", None))}}
ref = {"a": {"kernel": w, "bias": b}, "b": {"kernel": v}}
builders = {
    "magnitude": lambda t: pj.magnitude_masks(t, 0.5),
    "global": lambda t: pj.magnitude_masks(t, 0.5, scope="global"),
    "unit": lambda t: pj.unit_masks(t, 0.5, prune_output=True),
    "nm": lambda t: pj.nm_masks(t, 2, 4),
    "block": lambda t: pj.block_masks(t, 0.5, block=(4, 4)),
    "threshold": lambda t: pj.threshold_masks(t, 0.5),
}
for name, f in builders.items():
    want = f(ref)
    for mode, g in (("eager", f), ("jit", jax.jit(f))):
        got = g(tree)
        for layer in ("a", "b"):
            m = got[layer]["kernel"]
            assert np.array_equal(np.asarray(m), want[layer]["kernel"]), (name, mode, layer)
            assert m.sharding.spec == tree[layer]["kernel"].sharding.spec, (name, mode, layer)
print("EXPLICIT OK")
"""


def test_builders_on_an_explicit_mesh_outside_set_mesh():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "EXPLICIT OK" in r.stdout, r.stdout + r.stderr
