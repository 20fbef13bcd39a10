"""compact_model on Keras Functional models: chains compact exactly, branches are refused by name;
and the Functional MNIST example runs small."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

import prunejax.keras as pjk  # noqa: E402


def functional_mlp(sizes=(12, 32, 16, 3), *, seed=0, softmax=True):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((sizes[0],), name="pixels")
    x = layers.Dropout(0.1)(inp)
    x = layers.Dense(sizes[1], activation="relu", name="h1")(x)
    x = layers.Dropout(0.2)(x, training=False)
    x = layers.Dense(sizes[2], name="h2")(x)
    x = layers.Activation("tanh")(x)
    x = layers.Dense(sizes[3], name="logits")(x)
    if softmax:
        x = layers.Softmax()(x)
    return keras.Model(inp, x, name="fmlp")


def data(n=64, d=12, seed=1):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_functional_chain_compacts_to_the_masked_models_outputs():
    model = functional_mlp()
    masks = pjk.unit_masks(model, 0.5)
    pjk.apply_masks(model, masks)
    x = data()
    small = pjk.compact_model(model)
    assert small.__class__.__name__ == "Functional"
    dense = [la for la in small.layers if isinstance(la, layers.Dense)]
    assert [d.units for d in dense] == [16, 8, 3]  # the output layer keeps its units
    assert [d.name for d in dense] == ["h1", "h2", "logits"]
    np.testing.assert_allclose(
        small.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    # the call keyword (training=False) is replayed, and the model saves and loads plainly
    kinds = [type(la).__name__ for la in small.layers]
    assert kinds == [
        "InputLayer",
        "Dropout",
        "Dense",
        "Dropout",
        "Dense",
        "Activation",
        "Dense",
        "Softmax",
    ]


def test_functional_compact_with_masks_argument_and_save(tmp_path):
    model = functional_mlp(softmax=False)
    masks = pjk.unit_masks(model, 0.25)
    small = pjk.compact_model(model, masks)
    x = data(seed=3)
    masked = keras.models.clone_model(model)
    masked.set_weights(model.get_weights())
    pjk.apply_masks(masked, masks)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), masked.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    n = pjk.save_model(small, tmp_path / "small.keras")
    loaded = keras.saving.load_model(tmp_path / "small.keras")
    assert n == (tmp_path / "small.keras").stat().st_size
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), small.predict(x, verbose=0))


def test_a_dense_output_read_by_two_layers_is_refused_by_name():
    inp = keras.Input((6,))
    h = layers.Dense(8, activation="relu", name="shared")(inp)
    a = layers.Dense(3, name="head_a")(h)
    b = layers.Dense(3, name="head_b")(h)
    model = keras.Model(inp, layers.Add(name="merge")([a, b]))
    with pytest.raises(ValueError, match=r"'shared'.*consumed by 2 layers.*head_a.*head_b"):
        pjk.compact_model(model)


def test_a_merge_and_a_residual_are_refused_by_name():
    inp = keras.Input((6,))
    h = layers.Dense(6, activation="relu", name="h")(inp)
    model = keras.Model(inp, layers.Dense(2)(layers.Add(name="residual")([inp, h])))
    with pytest.raises(ValueError, match=r"consumed by 2 layers"):
        pjk.compact_model(model)


def test_a_non_elementwise_op_between_dense_layers_is_refused_by_name():
    inp = keras.Input((6,))
    h = layers.Dense(8, name="h")(inp)
    h = layers.Softmax(name="mid_softmax")(h)
    model = keras.Model(inp, layers.Dense(2)(h))
    with pytest.raises(ValueError, match=r"'mid_softmax'.*Softmax.*between Dense"):
        pjk.compact_model(model)
    inp = keras.Input((6,))
    h = keras.ops.relu(layers.Dense(8, name="h")(inp))
    model = keras.Model(inp, layers.Dense(2)(h))
    with pytest.raises(ValueError, match=r"'relu'.*Relu.*between Dense"):
        pjk.compact_model(model)


def test_two_inputs_a_shared_layer_and_a_subclassed_model_are_refused():
    a, b = keras.Input((4,)), keras.Input((4,))
    model = keras.Model([a, b], layers.Dense(2)(layers.Concatenate()([a, b])))
    with pytest.raises(ValueError, match="2 inputs"):
        pjk.compact_model(model)
    inp = keras.Input((4,))
    twice = layers.Dense(4, activation="relu", name="twice")
    model = keras.Model(inp, layers.Dense(2)(twice(twice(inp))))
    with pytest.raises(ValueError, match=r"'twice'.*called 2 times"):
        pjk.compact_model(model)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = layers.Dense(3)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.ones((1, 4), np.float32))
    with pytest.raises(TypeError, match=r"Sequential or a Functional.*Sub"):
        pjk.compact_model(sub)


def test_example_runs_small(tmp_path):
    from examples import keras_functional

    result = keras_functional.main(
        [
            "--subset",
            "512",
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--repeats",
            "5",
            "--out",
            str(tmp_path),
        ]
    )
    assert result["max_abs_diff"] <= 1e-4
    assert result["widths"][-1] == 10 and result["widths"][0] < result["dense_widths"][0]
    assert result["compact_bytes"] < result["dense_bytes"]
    assert 0.0 <= result["accuracy"]["compact"] <= 1.0


def test_keras_unit_masks_output_opt_in_and_conv_filters_with_their_bias():
    model = functional_mlp()
    default = pjk.unit_masks(model, 0.5)
    opt = pjk.unit_masks(model, 0.5, prune_output=True)
    logits = model.get_layer("logits")
    k = [i for i, v in enumerate(model.weights) if v is logits.kernel][0]
    assert default[k].all() and default[k + 1].all()
    assert (~opt[k + 1]).sum() == 2 and np.array_equal(opt[k][0], opt[k + 1])
    for a, b in zip(default[:k], opt[:k], strict=True):
        np.testing.assert_array_equal(a, b)
    # a Conv2D kernel selected by where: whole filters, and the conv's own bias follows them
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            layers.Conv2D(4, 3, name="conv"),
            layers.Flatten(),
            layers.Dense(3),
        ]
    )
    m = pjk.unit_masks(cnn, 0.5, where=lambda path, leaf: path == "0")
    w = cnn.get_weights()[0]
    norms = np.linalg.norm(w.reshape(-1, 4).astype(np.float64), axis=0)
    keep = np.ones(4, bool)
    keep[np.argsort(norms, kind="stable")[:2]] = False
    np.testing.assert_array_equal(m[1], keep)
    np.testing.assert_array_equal(m[0], np.broadcast_to(keep, w.shape))
