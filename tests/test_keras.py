"""Keras 3 adapter: masks held through fit, compaction to a narrower Sequential, reports."""

import os
import zipfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np
import pytest

keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

from examples import keras_report  # noqa: E402
from prunejax import keras as pjk  # noqa: E402
from prunejax.masks import magnitude_masks, unit_masks  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        keras.backend.backend() != "jax", reason="these tests run Keras on the JAX backend"
    ),
    # Keras' Variable.__array__ predates NumPy 2's copy keyword
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

layers = keras.layers


def _mlp(sizes=(12, 16, 10, 3), *, activation="relu", seed=0, extra=()):
    keras.utils.set_random_seed(seed)
    stack = [keras.Input((sizes[0],))]
    for n in sizes[1:-1]:
        stack.append(layers.Dense(n, activation=activation, bias_initializer="random_normal"))
        stack.extend(extra)
    stack.append(layers.Dense(sizes[-1], bias_initializer="random_normal"))
    return keras.Sequential(stack)


def _data(n=96, d=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, size=n)
    return x, y


def _compile(model, optimizer=None):
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _pruned_entries(model, masks):
    return [w[~m] for w, m in zip(model.get_weights(), masks, strict=True)]


# ----------------------------------------------------------------------------- masks for a model


def test_masks_match_the_prunejax_builders_on_get_weights():
    model = _mlp()
    m = pjk.magnitude_masks(model, 0.75)
    ref = magnitude_masks(model.get_weights(), 0.75)
    assert len(m) == len(model.weights)
    for a, b in zip(m, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unit_masks_prune_hidden_units_only_with_their_biases():
    model = _mlp(sizes=(12, 16, 10, 3))
    m = pjk.unit_masks(model, 0.5)
    w = model.get_weights()
    # hidden kernels: round(0.5 * out) whole columns pruned, matching bias entries pruned
    for k, n_out in ((0, 16), (2, 10)):
        cols = m[k].all(axis=0)
        assert (~m[k]).sum(axis=0).tolist().count(12 if k == 0 else 16) == n_out // 2
        assert int((~cols).sum()) == n_out // 2
        np.testing.assert_array_equal(m[k + 1], cols)
    # the output layer is left alone
    assert m[4].all() and m[5].all()
    # the smallest-norm columns are the pruned ones
    norms = np.linalg.norm(w[0], axis=0)
    assert norms[~m[0].all(axis=0)].max() <= norms[m[0].all(axis=0)].min()
    # same answer as the generic builder restricted to the hidden kernels
    ref = unit_masks(w, 0.5, where=pjk.hidden_dense_where(model))
    for a, b in zip(m, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unit_masks_pair_biases_by_layer_not_by_list_position():
    # Dense without bias followed by BatchNormalization: the list heuristic would take the BN
    # scale for the kernel's bias.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(8, use_bias=False),
            layers.BatchNormalization(),
            layers.Dense(3),
        ]
    )
    m = pjk.unit_masks(model, 0.5)
    assert int((~m[0].all(axis=0)).sum()) == 4
    for i in range(1, 5):  # BN gamma, beta, moving mean, moving variance
        assert m[i].all()


def test_apply_masks_and_mask_validation():
    model = _mlp()
    m = pjk.magnitude_masks(model, 0.5)
    pjk.apply_masks(model, m)
    assert all(np.all(p == 0) for p in _pruned_entries(model, m))
    with pytest.raises(ValueError, match="entries"):
        pjk.apply_masks(model, m[:-1])
    bad = list(m)
    bad[2] = bad[2].astype(np.float32)
    with pytest.raises(TypeError, match=r"masks\[2\].*bool"):
        pjk.hold_masks(model, bad)
    bad[2] = np.ones((3, 3), bool)
    with pytest.raises(ValueError, match=r"masks\[2\] has shape"):
        pjk.hold_masks(model, bad)


# ----------------------------------------------------------------------------- holding masks


def test_fit_without_hold_resurrects_pruned_weights():
    """The control for the tests below: zeros written once do not survive Adam."""
    x, y = _data()
    model = _compile(_mlp())
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    m = pjk.magnitude_masks(model, 0.8)
    pjk.apply_masks(model, m)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert any(np.any(p != 0) for p in _pruned_entries(model, m))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: keras.optimizers.Adam(1e-2),
        lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    ],
    ids=["adam", "adamw"],
)
def test_hold_masks_keeps_exact_zeros_through_fit(make_opt):
    x, y = _data()
    model = _compile(_mlp(), make_opt())
    # train dense first: the optimizer holds nonzero moments at soon-pruned entries and the
    # train step is already compiled without constraints
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    m = pjk.magnitude_masks(model, 0.8)
    before = model.get_weights()
    with pjk.hold_masks(model, m) as hold:
        assert hold.active and model.train_function is None
        model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[hold])
        after = model.get_weights()
    assert all(np.all(p == 0) for p in _pruned_entries(model, m))
    # kept weights did train
    assert any(np.any(a[k] != b[k]) for a, b, k in zip(after, before, m, strict=True))
    # released: no MaskConstraint left, and the next fit traces a step without them
    assert not hold.active and model.train_function is None
    assert not any(isinstance(v.constraint, pjk.MaskConstraint) for v in model.weights)


def test_hold_masks_without_callback_and_across_fits():
    x, y = _data()
    model = _compile(_mlp())
    m = pjk.unit_masks(model, 0.5)
    pjk.hold_masks(model, m)
    for _ in range(2):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        assert all(np.all(p == 0) for p in _pruned_entries(model, m))
    pjk.release_masks(model)
    assert all(v.constraint is None for v in model.weights)


def test_hold_masks_with_ema_is_exact_with_the_callback():
    # fit() swaps in the EMA weights after the last step; the callback re-applies the masks
    x, y = _data()
    model = _compile(_mlp(), keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.9))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    m = pjk.magnitude_masks(model, 0.8)
    with pjk.hold_masks(model, m) as hold:
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[hold])
    assert all(np.all(p == 0) for p in _pruned_entries(model, m))


def test_hold_masks_composes_with_an_existing_constraint():
    keras.utils.set_random_seed(0)
    norm = keras.constraints.MaxNorm(0.5)
    model = keras.Sequential(
        [
            keras.Input((12,)),
            layers.Dense(16, activation="relu", kernel_constraint=norm),
            layers.Dense(3),
        ]
    )
    _compile(model)
    x, y = _data()
    m = pjk.magnitude_masks(model, 0.6)
    hold = pjk.hold_masks(model, m)
    c = model.layers[0].kernel.constraint
    assert isinstance(c, pjk.MaskConstraint) and c.inner is norm
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    w = model.get_weights()[0]
    assert np.all(w[~m[0]] == 0)
    assert np.linalg.norm(w, axis=0).max() <= 0.5 + 1e-5
    hold.release()
    assert model.layers[0].kernel.constraint is norm


def test_mask_constraint_serializes():
    mask = np.array([[True, False], [False, True]])
    c = pjk.MaskConstraint(mask, keras.constraints.NonNeg())
    back = keras.constraints.deserialize(keras.constraints.serialize(c))
    assert isinstance(back, pjk.MaskConstraint) and isinstance(back.inner, keras.constraints.NonNeg)
    np.testing.assert_array_equal(back.mask, mask)
    w = np.array([[1.5, 2.0], [3.0, -4.0]], np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(back(w)), [[1.5, 0], [0, 0]])


def test_hold_masks_rejects_pruning_a_non_trainable_weight():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), layers.Dense(4), layers.BatchNormalization(), layers.Dense(3)]
    )
    m = [np.ones(w.shape, bool) for w in model.get_weights()]
    m[4] = np.zeros_like(m[4])  # moving mean
    with pytest.raises(ValueError, match="non-trainable"):
        pjk.hold_masks(model, m)


def test_saved_file_needs_nothing_from_prunejax(tmp_path):
    x, y = _data()
    model = _compile(_mlp())
    m = pjk.magnitude_masks(model, 0.5)
    with pjk.hold_masks(model, m):
        model.fit(x, y, epochs=1, batch_size=32, verbose=0)
        size = pjk.save_model(model, tmp_path / "m.keras")
    assert size == (tmp_path / "m.keras").stat().st_size
    loaded = keras.saving.load_model(tmp_path / "m.keras", custom_objects={}, compile=False)
    assert all(v.constraint is None for v in loaded.weights)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    with pytest.raises(ValueError, match=r"\.keras"):
        pjk.save_model(model, tmp_path / "m.h5")


def test_saved_file_has_no_optimizer_state(tmp_path):
    model = _compile(_mlp(sizes=(12, 64, 64, 3)))
    model.optimizer.build(model.trainable_variables)  # Adam's moments exist, as after fit
    trained = pjk.save_model(model, tmp_path / "a.keras")
    fresh = pjk.save_model(_mlp(sizes=(12, 64, 64, 3), seed=1), tmp_path / "b.keras")
    # Adam's two moments per weight would more than double the file
    assert abs(trained - fresh) < 0.01 * fresh
    with zipfile.ZipFile(tmp_path / "a.keras") as z, z.open("model.weights.h5") as f:
        names = []
        h5py.File(f, "r").visit(names.append)
    assert not [n for n in names if n.startswith("optimizer")]
    assert model.optimizer is not None  # the model itself is unchanged


# ----------------------------------------------------------------------------- compaction


def _assert_same_predictions(a, b, x):
    np.testing.assert_allclose(
        a.predict(x, verbose=0), b.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )


def test_compact_model_equals_the_masked_model():
    x, y = _data()
    model = _compile(_mlp(sizes=(12, 16, 10, 3)))
    m = pjk.unit_masks(model, 0.5)
    with pjk.hold_masks(model, m):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    small = pjk.compact_model(model)
    assert isinstance(small, keras.Sequential) and small is not model
    assert [d.units for d in small.layers] == [8, 5, 3]
    assert [d.get_config()["activation"] for d in small.layers] == ["relu", "relu", "linear"]
    assert [w.shape for w in small.get_weights()] == [(12, 8), (8,), (8, 5), (5,), (5, 3), (3,)]
    _assert_same_predictions(model, small, x)
    total, nonzero = keras_report.count_params(small)
    assert total == 12 * 8 + 8 + 8 * 5 + 5 + 5 * 3 + 3 and nonzero <= total


def test_compact_model_with_masks_argument_and_kept_indices():
    model = _mlp(sizes=(12, 16, 10, 3))
    m = pjk.unit_masks(model, 0.25)
    small = pjk.compact_model(model, m)
    _, kept = pjk.compact_weights(model, m)
    np.testing.assert_array_equal(kept[0], np.flatnonzero(m[0].all(axis=0)))
    np.testing.assert_array_equal(kept[1], np.flatnonzero(m[2].all(axis=0)))
    np.testing.assert_array_equal(kept[2], np.arange(3))
    x, _ = _data()
    masked = keras.models.clone_model(model)
    masked.set_weights([np.where(k, w, 0) for w, k in zip(model.get_weights(), m, strict=True)])
    _assert_same_predictions(masked, small, x)


def test_compact_folds_constants_of_dead_units_per_layer_activation():
    """sigmoid(0) = 0.5: a unit-pruned sigmoid unit feeds a constant the next bias must absorb;
    the layers use different activations."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12,)),
            layers.Dense(16, activation="sigmoid", bias_initializer="random_normal"),
            layers.Dense(10, activation="tanh", bias_initializer="random_normal"),
            layers.Activation("softplus"),
            layers.Dense(3, bias_initializer="random_normal"),
        ]
    )
    m = pjk.unit_masks(model, 0.5)
    pjk.apply_masks(model, m)
    small = pjk.compact_model(model)
    assert [layer.get_config().get("units") for layer in small.layers] == [8, 5, None, 3]
    assert isinstance(small.layers[2], layers.Activation)
    _assert_same_predictions(model, small, _data()[0])


def test_compact_keeps_passthrough_layers():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 3)),
            layers.Flatten(),
            layers.Dropout(0.3),
            layers.Dense(16, bias_initializer="random_normal"),
            layers.ReLU(),
            layers.Dropout(0.2),
            layers.GaussianNoise(0.1),
            layers.Dense(10, activation="gelu", bias_initializer="random_normal"),
            layers.Dense(3),
            layers.Softmax(),
        ]
    )
    m = pjk.unit_masks(model, 0.5)
    small = pjk.compact_model(model, m)
    assert [type(layer).__name__ for layer in small.layers] == [
        type(layer).__name__ for layer in model.layers
    ]
    assert [layer.units for layer in small.layers if isinstance(layer, layers.Dense)] == [8, 5, 3]
    assert small.layers[1].rate == 0.3 and small.layers[4].rate == 0.2
    pjk.apply_masks(model, m)
    x = np.random.default_rng(1).normal(size=(20, 4, 3)).astype(np.float32)
    _assert_same_predictions(model, small, x)


def test_compact_without_dead_units_is_the_same_model():
    model = _mlp()
    small = pjk.compact_model(model)
    assert [w.shape for w in small.get_weights()] == [w.shape for w in model.get_weights()]
    _assert_same_predictions(model, small, _data()[0])


def test_compact_bias_free_layers():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12,)),
            layers.Dense(16, activation="relu", use_bias=False),
            layers.Dense(10, activation="relu"),
            layers.Dense(3, use_bias=False),
        ]
    )
    m = pjk.unit_masks(model, 0.5)
    small = pjk.compact_model(model, m)
    assert [w.shape for w in small.get_weights()] == [(12, 8), (8, 5), (5,), (5, 3)]
    pjk.apply_masks(model, m)
    _assert_same_predictions(model, small, _data()[0])


@pytest.mark.parametrize(
    "middle, match",
    [
        (lambda: layers.BatchNormalization(), r"batch_normalization.*BatchNormalization.*weights"),
        (lambda: layers.LayerNormalization(), r"LayerNormalization.*weights"),
        (lambda: layers.Flatten(), r"Flatten.*not allowed between Dense layers"),
        (lambda: layers.Softmax(), r"Softmax.*not allowed between Dense layers"),
        (lambda: layers.Activation("softmax"), r"activation 'softmax'.*not a known elementwise"),
    ],
    ids=["batchnorm", "layernorm", "flatten", "softmax-layer", "softmax-activation"],
)
def test_compact_rejects_layers_it_cannot_handle(middle, match):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((12,)), layers.Dense(16, activation="relu"), middle(), layers.Dense(3)]
    )
    m = pjk.unit_masks(model, 0.5)
    with pytest.raises(ValueError, match=match):
        pjk.compact_model(model, m)


def test_compact_rejects_conv_layers():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            layers.Conv2D(4, 3),
            layers.Flatten(),
            layers.Dense(8, activation="relu"),
            layers.Dense(3),
        ]
    )
    with pytest.raises(ValueError, match=r"conv2d.*Conv2D.*weights"):
        pjk.compact_model(model)


def test_compact_rejects_a_hidden_softmax_dense_and_non_sequential_models():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((12,)), layers.Dense(8, activation="softmax"), layers.Dense(3)]
    )
    with pytest.raises(ValueError, match="softmax"):
        pjk.compact_model(model)
    # Functional chains compact (tests/test_keras_functional.py); a subclassed model does not

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = layers.Dense(8, activation="relu"), layers.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

    subclassed = Subclassed()
    subclassed(np.ones((1, 12), np.float32))
    with pytest.raises(TypeError, match="Sequential"):
        pjk.compact_model(subclassed)
    with pytest.raises(TypeError, match="keras.Model"):
        pjk.compact_model(model.get_weights())
    with pytest.raises(ValueError, match="no weights yet"):
        pjk.compact_model(keras.Sequential([layers.Dense(3)]))


# ----------------------------------------------------------------------------- report


def test_report_and_table(tmp_path):
    x, y = _data(n=64)
    dense = _mlp(sizes=(12, 64, 32, 3))
    m = pjk.unit_masks(dense, 0.5)
    small = pjk.compact_model(dense, m)
    rows = keras_report.report(
        {"dense": dense, "compact": small},
        x,
        y,
        out_dir=tmp_path,
        batch_sizes=(1, 100),
        repeats=3,
    )
    assert [r.name for r in rows] == ["dense", "compact"]
    d, c = rows
    assert d.params == sum(w.size for w in dense.get_weights())
    assert c.params == 12 * 32 + 32 + 32 * 16 + 16 + 16 * 3 + 3
    assert c.keras_bytes < d.keras_bytes
    assert c.keras_bytes == (tmp_path / "compact.keras").stat().st_size
    assert set(d.latency) == {1, 100} and all(t > 0 for t in d.latency.values())
    assert 0.0 <= d.accuracy <= 1.0
    preds = dense.predict(x, verbose=0).argmax(-1)
    assert d.accuracy == pytest.approx(np.mean(preds == y))
    c.extra["sparse file"] = 123
    table = keras_report.format_table(rows)
    assert table.count("\n") == 3 and "| compact |" in table and "123" in table
    with pytest.raises(ValueError, match="baseline"):
        keras_report.format_table(rows, baseline="nope")


def test_compact_names_the_keras_layers_when_a_constant_cannot_be_folded():
    # sigmoid(0) = 0.5 flows into a bias-free layer: the pruned units are not dead
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12,)),
            layers.Dense(16, activation="sigmoid", name="hidden"),
            layers.Dense(3, use_bias=False, name="logits"),
        ]
    )
    with pytest.raises(ValueError, match=r"'hidden'.*'logits'.*no bias to fold"):
        pjk.compact_model(model, pjk.unit_masks(model, 0.5))
