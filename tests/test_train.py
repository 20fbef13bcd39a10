import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import prunejax.apps.mnist.train as ptrain
from prunejax import apply_masks, magnitude_masks, masked
from prunejax.apps.mnist import (
    CheckpointError,
    TrainConfig,
    classifier_loss,
    evaluate,
    fit,
    gradual_pruning,
    iterative_pruning,
    load_checkpoint,
    make_optimizer,
    restore_checkpoint,
    save_checkpoint,
)
from prunejax.models import MLP

MODEL = MLP(features=(16, 3), dropout=0.1)
LOSS = classifier_loss(MODEL)


def _cfg(epochs, batch_size, seed=0, **kw):
    return TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, progress=False, **kw)


def _init(model=MODEL, seed=0, d=20):
    return model.init(jax.random.key(seed), np.zeros((1, d), np.float32))["params"]


def _leaves_equal(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_fit_learns_and_is_deterministic(toy_data):
    x, y, xt, yt = toy_data
    params = _init()
    tx = make_optimizer(1e-2, 4 * 12)
    a = fit(LOSS, params, tx, (x, y), _cfg(4, 32, 1), eval_fn=lambda p: evaluate(MODEL, p, xt, yt))
    b = fit(LOSS, params, tx, (x, y), _cfg(4, 32, 1))
    _leaves_equal(a.params, b.params)
    assert a.history[-1]["test_accuracy"] > 0.9
    assert [h["epoch"] for h in a.history] == [1, 2, 3, 4]
    assert evaluate(MODEL, a.params, xt, yt)["error"] == pytest.approx(a.history[-1]["test_error"])
    # the caller's params are not donated away
    assert np.isfinite(np.asarray(params["Dense_0"]["kernel"])).all()


def test_resume_after_interrupt_equals_uninterrupted_run(toy_data, tmp_path, monkeypatch):
    x, y, _, _ = toy_data
    params = _init()
    masks = magnitude_masks(params, 0.5)
    params = apply_masks(params, masks)

    def tx():
        return masked(make_optimizer(1e-2, 5 * 12), masks)

    full = fit(LOSS, params, tx(), (x, y), _cfg(5, 32, 7))

    ckpt = tmp_path / "run.ckpt"
    real_batches = ptrain.batches

    def interrupted(*args, epoch=0, **kw):
        for i, b in enumerate(real_batches(*args, epoch=epoch, **kw)):
            if epoch == 3 and i == 5:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(ptrain, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(LOSS, params, tx(), (x, y), _cfg(5, 32, 7), checkpoint=ckpt)
    monkeypatch.setattr(ptrain, "batches", real_batches)
    _, meta = load_checkpoint(ckpt)
    assert meta["epoch"] == 3  # the last complete epoch
    assert not list(tmp_path.glob("*.tmp"))
    resumed = fit(LOSS, params, tx(), (x, y), _cfg(5, 32, 7), checkpoint=ckpt, resume=True)
    _leaves_equal(full.params, resumed.params)
    _leaves_equal(full.opt_state, resumed.opt_state)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    k = np.asarray(resumed.params["Dense_0"]["kernel"])
    assert np.all(k[~np.asarray(masks["Dense_0"]["kernel"])] == 0)
    # other settings: refused
    with pytest.raises(CheckpointError, match="other settings"):
        fit(LOSS, params, tx(), (x, y), _cfg(5, 32, 8), checkpoint=ckpt, resume=True)


def test_checkpoint_errors(tmp_path):
    params = _init()
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"params": params}, {"note": "x"})
    tree, meta = restore_checkpoint(path, {"params": params})
    _leaves_equal(tree, {"params": params})
    assert meta == {"note": "x"}
    other = _init(MLP(features=(8, 3)))
    with pytest.raises(CheckpointError, match="different model.*params/Dense_0/"):
        restore_checkpoint(path, {"params": other})
    with pytest.raises(CheckpointError, match="missing leaves"):
        restore_checkpoint(path, {"params": _init(MLP(features=(16, 8, 3)))})
    data = path.read_bytes()
    (tmp_path / "t.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "t.ckpt")
    (tmp_path / "n.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "n.ckpt")


def _rehash(data: bytes) -> bytes:
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


def test_checkpoint_metadata_is_inside_the_hash(toy_data, tmp_path):
    x, y, _, _ = toy_data
    params = _init()
    ckpt = tmp_path / "run.ckpt"
    fit(LOSS, params, optax.adam(1e-2), (x, y), _cfg(2, 64), checkpoint=ckpt)
    assert ckpt.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as model files
    data = ckpt.read_bytes()
    assert data.index(b'"epoch": 2') < data.index(b'"history"')  # the top-level epoch
    edited = data.replace(b'"epoch": 2', b'"epoch": 3', 1)
    ckpt.write_bytes(edited)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        fit(LOSS, params, optax.adam(1e-2), (x, y), _cfg(4, 64), checkpoint=ckpt, resume=True)
    # with the hash recomputed the file is valid, but its epoch disagrees with its history
    ckpt.write_bytes(_rehash(edited))
    assert load_checkpoint(ckpt)[1]["epoch"] == 3
    with pytest.raises(CheckpointError, match="epoch 3 but its history"):
        fit(LOSS, params, optax.adam(1e-2), (x, y), _cfg(4, 64), checkpoint=ckpt, resume=True)
    ckpt.write_bytes(_rehash(data.replace(b'"epoch": 2', b'"epoch": 9', 1)))
    with pytest.raises(CheckpointError, match="epoch 9; this run has epochs 1..4"):
        fit(LOSS, params, optax.adam(1e-2), (x, y), _cfg(4, 64), checkpoint=ckpt, resume=True)
    ckpt.write_bytes(data)
    res = fit(LOSS, params, optax.adam(1e-2), (x, y), _cfg(2, 64), checkpoint=ckpt, resume=True)
    assert [h["epoch"] for h in res.history] == [1, 2]

    def other(p, xb, yb, key):  # the same loss under another model name
        return LOSS(p, xb, yb, key)

    with pytest.raises(CheckpointError, match="written for model 'MLP', this run trains 'other'"):
        fit(other, params, optax.adam(1e-2), (x, y), _cfg(2, 64), checkpoint=ckpt, resume=True)


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_checkpoint_refuses_old_format_dtypes_and_non_files(tmp_path):
    import flax.serialization

    params = _init()
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"params": params}, {"epoch": 1})
    as16 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float16), params)
    with pytest.raises(CheckpointError, match="dtype float32, expected float16"):
        restore_checkpoint(path, {"params": as16})
    # format version 1: the metadata beside, not inside, the hash
    state = flax.serialization.to_state_dict(jax.device_get({"params": params}))
    sb = flax.serialization.msgpack_serialize(state)
    v1 = {"format": "prunejax-checkpoint", "version": 1, "meta": "{}",
          "sha256": hashlib.sha256(sb).hexdigest(), "state": sb}  # fmt: skip
    (tmp_path / "v1.ckpt").write_bytes(flax.serialization.msgpack_serialize(v1))
    with pytest.raises(CheckpointError, match="format version 1.*start afresh"):
        load_checkpoint(tmp_path / "v1.ckpt")
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path / "dir.ckpt")
    with pytest.raises(CheckpointError, match="not a file"):
        save_checkpoint(tmp_path / "dir.ckpt", {"params": params})
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            load_checkpoint(fifo)
        except CheckpointError as e:
            outcome.append(str(e))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert outcome and "not a regular file" in outcome[0]
    with pytest.raises(CheckpointError, match="not a regular file"):
        fit(LOSS, params, optax.adam(1e-2), (np.zeros((8, 20), np.float32),
            np.zeros(8, np.int32)), _cfg(1, 8), checkpoint=fifo)  # fmt: skip


_KILL_SETUP = textwrap.dedent(
    """
    import time
    import jax, numpy as np
    from prunejax import apply_masks, magnitude_masks, masked
    from prunejax.apps.mnist import TrainConfig, classifier_loss, fit, make_optimizer
    from prunejax.models import MLP

    def train(ckpt, resume=False, slow=False):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(192, 20)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
        model = MLP(features=(16, 3), dropout=0.1)
        p = model.init(jax.random.key(0), x[:1])["params"]
        m = magnitude_masks(p, 0.5)
        p = apply_masks(p, m)
        # the killed run has slow epochs, so that the SIGKILL lands mid-run
        ev = (lambda params: (time.sleep(0.5), {})[1]) if slow else None
        return fit(classifier_loss(model), p, masked(make_optimizer(1e-2, 4 * 6), m), (x, y),
                   TrainConfig(epochs=4, batch_size=32, seed=3, progress=False),
                   checkpoint=ckpt, resume=resume, eval_fn=ev)
    """
)


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path):
    ckpt, done = tmp_path / "run.ckpt", tmp_path / "done"
    code = _KILL_SETUP + f"\ntrain({str(ckpt)!r}, slow=True)\nopen({str(done)!r}, 'w')\n"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ckpt.exists(), child.communicate(timeout=60)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL and not done.exists()
    epoch = load_checkpoint(ckpt)[1]["epoch"]
    assert 1 <= epoch < 4  # killed mid-way, after a complete checkpoint
    ns: dict = {}
    exec(_KILL_SETUP, ns)
    resumed = ns["train"](ckpt, resume=True)
    full = ns["train"](None)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for u, v in zip(
        jax.tree_util.tree_leaves((full.params, full.opt_state)),
        jax.tree_util.tree_leaves((resumed.params, resumed.opt_state)),
        strict=True,
    ):  # bitwise: the same dtype, shape and bytes
        u, v = np.asarray(u), np.asarray(v)
        assert (u.dtype, u.shape, u.tobytes()) == (v.dtype, v.shape, v.tobytes())


def test_nan_loss_names_the_step(toy_data):
    x, y, _, _ = toy_data
    x = x.copy()
    bad = 100
    x[bad, 0] = np.nan
    batch, seed = 32, 3
    order = np.random.default_rng([seed, 0]).permutation(len(x))
    step = int(np.flatnonzero(order == bad)[0]) // batch
    with pytest.raises(FloatingPointError, match=f"at step {step} "):
        fit(LOSS, _init(), optax.adam(1e-3), (x, y), _cfg(1, batch, seed, log_every=4))


def test_bad_inputs(toy_data):
    x, y, _, _ = toy_data
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(0.0, 10)
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(-1e-3, 10)
    with pytest.raises(ValueError, match="schedule"):
        make_optimizer(1e-3, 10, schedule="warmup-cosine-magic")
    with pytest.raises(ValueError, match="larger than the split"):
        fit(LOSS, _init(), optax.adam(1e-3), (x, y), _cfg(1, len(x) + 1))
    with pytest.raises(ValueError, match="epochs"):
        fit(LOSS, _init(), optax.adam(1e-3), (x, y), _cfg(-1, 8))


def test_iterative_pruning_rounds(toy_data, tmp_path):
    x, y, xt, yt = toy_data
    params = fit(LOSS, _init(), make_optimizer(1e-2, 24), (x, y), _cfg(2, 32)).params
    seen = []
    res = iterative_pruning(
        LOSS,
        params,
        (x, y),
        sparsities=[0.5, 0.75],
        optimizer=lambda n: make_optimizer(1e-3, n),
        config=_cfg(1, 32),
        eval_fn=lambda p: evaluate(MODEL, p, xt, yt),
        checkpoint_dir=tmp_path,
        on_round=seen.append,
    )
    assert [r.round for r in res] == [1, 2] and len(seen) == 2
    k1 = np.asarray(res[0].masks["Dense_0"]["kernel"])
    k2 = np.asarray(res[1].masks["Dense_0"]["kernel"])
    assert (~k1).sum() == 160 and (~k2).sum() == 240
    assert not np.any(k2 & ~k1)  # nothing regrows
    w = np.asarray(res[1].params["Dense_0"]["kernel"])
    assert np.all(w[~k2] == 0)
    assert res[1].density == pytest.approx((80 + 12) / (320 + 48))
    assert res[1].test_error is not None and res[1].test_error < 0.2
    assert (tmp_path / "round2.ckpt").exists()


def test_gradual_pruning_reaches_the_target(toy_data):
    x, y, _, _ = toy_data
    params, masks, res = gradual_pruning(
        LOSS,
        _init(),
        (x, y),
        sparsity={"Dense_0/kernel": 0.8, "Dense_1/kernel": 0.5},
        optimizer=lambda n: make_optimizer(1e-2, n),
        config=_cfg(3, 32),
        update_every=5,
    )
    k0 = np.asarray(masks["Dense_0"]["kernel"])
    assert (~k0).sum() == 256
    assert (~np.asarray(masks["Dense_1"]["kernel"])).sum() == 24
    assert np.all(np.asarray(params["Dense_0"]["kernel"])[~k0] == 0)
    assert res.history[-1]["density"] == pytest.approx((64 + 24) / (320 + 48))


_MULTI = textwrap.dedent(
    """
    import jax, numpy as np
    assert jax.device_count() == 4, jax.devices()
    from prunejax import MLP, apply_masks, magnitude_masks, masked
    from prunejax.apps.mnist import TrainConfig, classifier_loss, data_mesh, fit, make_optimizer
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 20)).astype(np.float32)
    y = rng.integers(0, 3, 256).astype(np.int32)
    model = MLP(features=(32, 3), dropout=0.1)
    p = model.init(jax.random.key(0), x[:1])["params"]
    m = magnitude_masks(p, 0.5)
    p = apply_masks(p, m)
    out = {}
    for n in (1, 4):
        r = fit(classifier_loss(model), p, masked(make_optimizer(1e-2, 24), m), (x, y),
                TrainConfig(epochs=3, batch_size=32, seed=0, progress=False),
                mesh=data_mesh(jax.devices()[:n]))
        out[n] = r
    for a, b in zip(jax.tree_util.tree_leaves(out[1].params),
                    jax.tree_util.tree_leaves(out[4].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    l1 = [h["loss"] for h in out[1].history]
    l4 = [h["loss"] for h in out[4].history]
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    k = np.asarray(out[4].params["Dense_0"]["kernel"])
    assert np.all(k[~np.asarray(m["Dense_0"]["kernel"])] == 0)
    try:
        fit(classifier_loss(model), p, make_optimizer(1e-2, 8), (x, y),
            TrainConfig(epochs=1, batch_size=30, seed=0, progress=False), mesh=data_mesh())
    except ValueError as e:
        assert "multiple of the number of devices" in str(e)
    else:
        raise AssertionError("batch 30 over 4 devices should be refused")
    print("MULTI-DEVICE OK", l4)
    """
)


def test_data_parallel_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run(
        [sys.executable, "-c", _MULTI],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MULTI-DEVICE OK" in r.stdout


def test_cli_rejects_bad_input(tmp_path, capsys):
    from prunejax.apps.mnist.cli import main

    assert main(["mnist", "--lr", "0", "--out", str(tmp_path)]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["mnist", "--batch-size", "0", "--out", str(tmp_path)]) == 2
    assert main(["mnist", "--densities", "0.1,0.2", "--out", str(tmp_path)]) == 2
    assert "3 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["mnist", "--method", "nonsense"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["mnist", "--schedule", "nonsense"])
    from prunejax.apps.mnist.recipe import mask_builder

    with pytest.raises(ValueError, match="unknown mask method"):
        mask_builder("nonsense", ["Dense_0"])


def test_layer_densities():
    from prunejax.apps.mnist.recipe import layer_densities

    sizes = [235200, 30000, 1000]
    assert layer_densities(sizes) == (0.08, 0.09, 0.26)
    d = layer_densities(sizes, target=0.02)
    kept = sum(a * b for a, b in zip(d, sizes, strict=True)) / sum(sizes)
    assert kept == pytest.approx(0.02, rel=1e-6)
    assert d[2] > d[1] > d[0]
    with pytest.raises(ValueError):
        layer_densities(sizes, target=0.0)


@pytest.mark.slow
def test_real_mnist_subset_trains():
    from prunejax.apps.mnist.data import find_data_dir, load_mnist

    try:
        find_data_dir()
    except FileNotFoundError:
        pytest.skip("MNIST not found offline")
    d = load_mnist()
    model = MLP(features=(100, 10))
    params = _init(model, d=784)
    res = fit(
        classifier_loss(model),
        params,
        make_optimizer(3e-3, 155),
        (d.x_train[:4000], d.y_train[:4000]),
        _cfg(5, 128),
    )
    assert evaluate(model, res.params, d.x_test[:2000], d.y_test[:2000])["accuracy"] > 0.9
    masks = magnitude_masks(res.params, {"Dense_0/kernel": 0.9})
    pruned = apply_masks(res.params, masks)
    ft = fit(
        classifier_loss(model),
        pruned,
        masked(make_optimizer(3e-3, 93), masks),
        (d.x_train[:4000], d.y_train[:4000]),
        _cfg(3, 128),
    )
    k = np.asarray(ft.params["Dense_0"]["kernel"])
    assert np.count_nonzero(k) == round(0.1 * k.size)
    assert evaluate(model, ft.params, d.x_test[:2000], d.y_test[:2000])["accuracy"] > 0.9


@pytest.mark.parametrize("method", ["magnitude", "threshold", "global"])
def test_cli_mask_methods_hit_the_densities(method):
    from prunejax.apps.mnist.recipe import mask_builder

    params = _init(MLP(features=(40, 30, 5)))
    names = ["Dense_0", "Dense_1", "Dense_2"]
    s = (0.9, 0.8, 0.5)
    masks = mask_builder(method, names)(params, s)
    kept = [int(np.asarray(masks[n]["kernel"]).sum()) for n in names]
    sizes = [800, 1200, 150]
    if method == "global":
        want = sum((1 - a) * b for a, b in zip(s, sizes, strict=True))
        assert abs(sum(kept) - want) <= 1
    else:
        for k, a, n in zip(kept, s, sizes, strict=True):
            assert abs(k - (1 - a) * n) <= 1
    assert all(np.asarray(masks[n]["bias"]).all() for n in names)


_PIPED = textwrap.dedent(
    """
    import jax, numpy as np
    from prunejax.apps.mnist import TrainConfig, classifier_loss, fit, make_optimizer
    from prunejax.models import MLP
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 20)).astype(np.float32)
    y = rng.integers(0, 3, 128).astype(np.int32)
    model = MLP(features=(16, 3))
    p = model.init(jax.random.key(0), x[:1])["params"]
    fit(classifier_loss(model), p, make_optimizer(1e-2, 12), (x, y),
        TrainConfig(epochs=3, batch_size=32, desc="piped", log_every=1))
    """
)


def test_progress_off_a_terminal_is_one_plain_line_per_epoch():
    r = subprocess.run(
        [sys.executable, "-c", _PIPED],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "\r" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("piped ")]
    assert [ln.split(":")[0] for ln in lines] == ["piped 1/3", "piped 2/3", "piped 3/3"]
    assert all("loss" in ln and "sparsity" in ln for ln in lines)
