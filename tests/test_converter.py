"""Converted bundles against TensorFlow: inference, one train step, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from converters.bundle import convert_bundle, convert_teacher  # noqa: E402
from converters.heads import check_output_activations, output_kinds  # noqa: E402
from converters.layers import read_student  # noqa: E402
from converters.trainable import TrainableScope  # noqa: E402
from dslo_edge.bundle import load_bundle  # noqa: E402
from dslo_edge.errors import BundleError, ConversionError  # noqa: E402
from dslo_edge.models import StudentModel  # noqa: E402

TEMPERATURE = 2.0
LEARNING_RATE = 0.1


def _batch(size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hard = rng.integers(0, 10, size=size).astype(np.int32)
    hard[::3] = -1  # every third sample has no hard label
    return {
        "x": rng.random((size, 64), dtype=np.float32),
        "soft": rng.dirichlet(np.ones(10), size=size).astype(np.float32),
        "hard": hard,
        "alpha": rng.uniform(0.2, 0.8, size=size).astype(np.float32),
    }


def _tensorflow_step(model, batch: dict[str, np.ndarray]):
    """One SGD step of the distillation loss with TensorFlow's own autodiff."""
    logits_model = keras.models.clone_model(model)
    logits_model.set_weights(model.get_weights())
    logits_model.layers[-1].activation = keras.activations.linear
    x = tf.constant(batch["x"])
    soft = tf.constant(batch["soft"])
    alpha = tf.constant(batch["alpha"])
    with tf.GradientTape() as tape:
        z = logits_model(x)
        log_q_t = tf.nn.log_softmax(z / TEMPERATURE)
        kl = tf.reduce_sum(tf.math.xlogy(soft, soft) - soft * log_q_t, axis=-1)
        one_hot = tf.one_hot(batch["hard"], 10)  # -1 gives an all-zero row
        ce = -tf.reduce_sum(one_hot * tf.nn.log_softmax(z), axis=-1)
        per_sample = alpha * TEMPERATURE**2 * kl + (1.0 - alpha) * ce
        loss = tf.reduce_mean(per_sample)
    grads = tape.gradient(loss, logits_model.trainable_variables)
    updated = [
        (v - LEARNING_RATE * g).numpy()
        for v, g in zip(logits_model.trainable_variables, grads, strict=True)
    ]
    return float(loss), updated


def test_infer_matches_keras_predict(mlp_pair) -> None:
    student = StudentModel(load_bundle(mlp_pair.bundle))
    x = np.random.default_rng(1).random((7, 64), dtype=np.float32)
    expected = mlp_pair.student.predict(x, verbose=0)
    np.testing.assert_allclose(student.infer(x), expected, rtol=0, atol=1e-5)


def test_teacher_file_matches_keras_predict(mlp_pair) -> None:
    from dslo_edge.models import TeacherModel

    bundle = load_bundle(mlp_pair.bundle)
    teacher = TeacherModel(bundle.teacher_path, bundle.teacher_output_kind)
    x = np.random.default_rng(2).random((5, 64), dtype=np.float32)
    expected = mlp_pair.teacher.predict(x, verbose=0)
    assert bundle.teacher_output_kind == "probabilities"
    np.testing.assert_allclose(teacher.predict(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 16])
def test_train_step_matches_tensorflow(mlp_pair, batch_size: int) -> None:
    student = StudentModel(load_bundle(mlp_pair.bundle))
    before = list(student.get_weights().values())
    batch = _batch(batch_size, seed=batch_size)

    loss = student.train_step(
        batch["x"],
        batch["soft"],
        batch["hard"],
        batch["alpha"],
        TEMPERATURE,
        LEARNING_RATE,
    )
    expected_loss, expected_weights = _tensorflow_step(mlp_pair.student, batch)

    assert loss == pytest.approx(expected_loss, rel=1e-4)
    after = list(student.get_weights().values())
    for old, new, reference in zip(before, after, expected_weights, strict=True):
        step = new - old
        reference_step = reference - old
        error = np.max(np.abs(step - reference_step))
        assert error <= 1e-4 * np.max(np.abs(reference_step))


def test_kd_term_golden_value(tmp_path) -> None:
    # Inputs are log(q) and the student is one identity Dense layer, so the
    # student's probabilities are exactly q.
    student = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(3, activation="softmax")]
    )
    student.set_weights([np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    teacher = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    convert_bundle(teacher, student, tmp_path / "bundle")
    model = StudentModel(load_bundle(tmp_path / "bundle"))
    q = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32)
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)

    loss = model.train_step(
        np.log(q), p, np.array([-1, -1], np.int32), np.ones(2, np.float32), 1.0, 0.0
    )

    expected = np.mean(np.sum(p * np.log(p / q), axis=1))
    assert expected == pytest.approx(0.0592, abs=5e-5)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_student_tf_softmax_trains_like_softmax(tmp_path) -> None:
    student = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(3),
            keras.layers.Activation(tf.nn.softmax),
        ]
    )
    student.set_weights([np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    teacher = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    convert_bundle(teacher, student, tmp_path / "bundle")
    model = StudentModel(load_bundle(tmp_path / "bundle"))
    q = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32)
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)

    loss = model.train_step(
        np.log(q), p, np.array([-1, -1], np.int32), np.ones(2, np.float32), 1.0, 0.0
    )

    assert loss == pytest.approx(0.0592, abs=5e-5)


def test_manifest_lists_builtin_ops_and_checksums(mlp_pair) -> None:
    manifest = json.loads((mlp_pair.bundle / "manifest.json").read_text())
    train = manifest["student"]["signatures"]["train"]

    assert manifest["format_version"] == 1
    assert manifest["class_count"] == 10
    assert manifest["input"] == {"shape": [None, 64], "dtype": "float32"}
    assert manifest["runtime"]["flex"] is False
    assert "ASSIGN_VARIABLE" in train["ops"]
    assert not [op for op in train["ops"] if op.startswith("Flex")]
    assert sorted(train["inputs"]) == [
        "alpha",
        "hard",
        "learning_rate",
        "soft",
        "temperature",
        "x",
    ]
    assert train["inputs"]["hard"]["dtype"] == "int32"
    assert len(manifest["student"]["sha256"]) == 64
    assert set(manifest["student"]["signatures"]) == {
        "infer",
        "train",
        "get_weights",
        "set_weights",
    }


def test_corrupt_bundle_file_is_rejected(mlp_pair, tmp_path) -> None:
    copy = tmp_path / "bundle"
    copy.mkdir()
    for path in mlp_pair.bundle.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    data = bytearray((copy / "student.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "student.tflite").write_bytes(bytes(data))

    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(copy)


def test_unsupported_layer_is_named(tmp_path) -> None:
    student = keras.Sequential(
        [
            keras.Input((8, 4)),
            keras.layers.LSTM(4, name="memory"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    teacher = keras.Sequential(
        [keras.Input((8, 4)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )

    with pytest.raises(ConversionError, match="'memory'.*LSTM.*supported"):
        convert_bundle(teacher, student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("dtype", ["int32", "uint8", "float16"])
def test_student_input_not_float32_is_rejected(tmp_path, dtype) -> None:
    # Keras casts each sample to the input dtype first, so an int32 student
    # drops fractions that a float32 train signature would keep.
    inputs = keras.Input((8,), dtype=dtype, name="pixels")
    student = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])

    message = f"input 'pixels' has dtype {dtype}.*dtype=\"float32\""
    with pytest.raises(ConversionError, match=message):
        convert_bundle(teacher, student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            keras.layers.Dense(4, kernel_regularizer="l2", name="hidden"),
            "'hidden' sets kernel_regularizer=L2.*--optimizer adamw",
        ),
        (
            keras.layers.Dense(
                4, bias_constraint=keras.constraints.NonNeg(), name="hidden"
            ),
            "'hidden' sets bias_constraint=NonNeg.*set bias_constraint=None",
        ),
        (
            keras.layers.BatchNormalization(gamma_regularizer="l1", name="norm"),
            "'norm' sets gamma_regularizer=L1",
        ),
    ],
)
def test_regularizer_or_constraint_is_rejected(tmp_path, layer, message) -> None:
    student = keras.Sequential([keras.Input((6,)), layer, keras.layers.Dense(3)])
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])

    with pytest.raises(ConversionError, match=message):
        convert_bundle(teacher, student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda model: model.layers[0].enable_lora(2), "lora_kernel_a, lora_kernel_b"),
        (lambda model: model.quantize("int8"), "kernel_scale"),
    ],
    ids=["lora", "quantized"],
)
# Keras 3 warns that the model's InputLayer has nothing to quantize.
@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have a `quantize`")
def test_lora_or_quantized_dense_is_rejected(tmp_path, change, message) -> None:
    student = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dense(3)]
    )
    change(student)
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])

    with pytest.raises(ConversionError, match=f"'hidden' has the weights {message}"):
        convert_bundle(teacher, student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    ("scope", "freeze"),
    [("all", True), ("biases-and-batchnorm", False)],
    ids=["frozen", "no_biases"],
)
def test_student_without_trained_weight_is_rejected(tmp_path, scope, freeze) -> None:
    student = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, use_bias=False),
            keras.layers.Dense(3, use_bias=False),
        ]
    )
    student.trainable = not freeze
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])

    with pytest.raises(
        ConversionError, match=f"no weight that trainable scope {scope}"
    ):
        convert_bundle(
            teacher, student, tmp_path / "bundle", trainable=TrainableScope.parse(scope)
        )
    assert not (tmp_path / "bundle").exists()


def _student_with_hidden_layers(*names: str) -> keras.Model:
    x = keras.Input((6,))
    hidden = x
    for name in names:
        hidden = keras.layers.Dense(4, activation="relu", name=name)(hidden)
    return keras.Model(x, keras.layers.Dense(3, name="out")(hidden))


def _plain_teacher() -> keras.Model:
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, activation="softmax")]
    )


def test_non_ascii_layer_name_converts(tmp_path) -> None:
    student = _student_with_hidden_layers("größe")

    convert_bundle(_plain_teacher(), student, tmp_path / "bundle")

    weights = json.loads((tmp_path / "bundle" / "manifest.json").read_text())[
        "student"
    ]["weights"]
    assert "gr__e_kernel" in weights
    assert "gr__e_bias" in weights


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("a-b", "a_b"), "layers 'a-b' and 'a_b' both give the weight name 'a_b_"),
        (("1st",), "layer '1st' gives the weight name '1st_.*start with a letter"),
        (("_hidden",), "layer '_hidden' gives .*start with a letter"),
    ],
)
def test_unexportable_layer_name_is_rejected(tmp_path, names, message) -> None:
    student = _student_with_hidden_layers(*names)

    with pytest.raises(ConversionError, match=message):
        convert_bundle(_plain_teacher(), student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_teacher_layer_name_tensorflow_rejects(tmp_path) -> None:
    teacher = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, activation="softmax", name="größe")]
    )
    student = _student_with_hidden_layers("hidden")

    with pytest.raises(ConversionError, match="teacher's layer 'größe' has a name"):
        convert_bundle(teacher, student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(ConversionError, match="teacher's layer 'größe' has a name"):
        convert_teacher(teacher, tmp_path / "teacher.tflite")


def test_teacher_sigmoid_output_is_rejected(tmp_path) -> None:
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    teacher = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, activation="sigmoid", name="out")]
    )

    with pytest.raises(ConversionError, match="teacher's output layer 'out' applies"):
        convert_bundle(teacher, student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(ConversionError, match="neither logits nor softmax"):
        convert_teacher(teacher, tmp_path / "teacher.tflite")
    assert not (tmp_path / "teacher.tflite").exists()


def test_teacher_log_softmax_output_is_logits(tmp_path) -> None:
    # softmax(log_softmax(z)) equals softmax(z), so log-probabilities are
    # logits that the hub and the device read correctly.
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    teacher = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, activation="log_softmax")]
    )

    manifest = convert_bundle(teacher, student, tmp_path / "bundle")

    assert manifest["teacher"]["output_kind"] == "logits"
    assert load_bundle(tmp_path / "bundle").teacher_output_kind == "logits"


def _teacher_ending_in(*layers) -> keras.Model:
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), *layers])


# The layers after a Dense(3) teacher output, and the output kind they give.
OUTPUT_KINDS = {
    "dense": (lambda: [], "logits"),
    "softmax activation": (
        lambda: [keras.layers.Activation("softmax")],
        "probabilities",
    ),
    "tf.nn.softmax": (
        lambda: [keras.layers.Activation(tf.nn.softmax)],
        "probabilities",
    ),
    "tf.nn.log_softmax": (
        lambda: [keras.layers.Activation(tf.nn.log_softmax)],
        "logits",
    ),
    "softmax layer, dropout": (
        lambda: [keras.layers.Softmax(), keras.layers.Dropout(0.3)],
        "probabilities",
    ),
    "softmax, noise, dropout": (
        lambda: [
            keras.layers.Activation("softmax"),
            keras.layers.GaussianNoise(0.1),
            keras.layers.Dropout(0.3),
        ],
        "probabilities",
    ),
    "dropout": (lambda: [keras.layers.Dropout(0.3)], "logits"),
}


@pytest.mark.parametrize(("layers", "kind"), OUTPUT_KINDS.values(), ids=OUTPUT_KINDS)
def test_teacher_output_kind_past_dropout(layers, kind) -> None:
    teacher = _teacher_ending_in(*layers())

    check_output_activations(teacher, "teacher")

    assert list(output_kinds(teacher).values()) == [kind]


def test_sigmoid_behind_dropout_is_rejected() -> None:
    teacher = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(3, activation="sigmoid", name="scores"),
            keras.layers.Dropout(0.3, name="drop"),
        ]
    )

    with pytest.raises(ConversionError) as caught:
        check_output_activations(teacher, "teacher")

    assert str(caught.value).startswith(
        "the teacher's output layer 'drop' passes on the values of layer "
        "'scores', which applies sigmoid, so its outputs are neither logits nor "
        "softmax probabilities"
    )


def test_teacher_tf_softmax_converts_as_probabilities(tmp_path) -> None:
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    teacher = _teacher_ending_in(
        keras.layers.Activation(tf.nn.softmax), keras.layers.Dropout(0.3)
    )

    manifest = convert_bundle(teacher, student, tmp_path / "bundle")

    assert manifest["teacher"]["output_kind"] == "probabilities"
    assert load_bundle(tmp_path / "bundle").teacher_output_kind == "probabilities"


@pytest.mark.parametrize(
    "ending",
    [
        [keras.layers.Reshape((1, 3)), keras.layers.Softmax(), keras.layers.Flatten()],
        [keras.layers.Softmax(), keras.layers.Reshape((3,))],
        [keras.layers.Softmax(), keras.layers.Identity()],
    ],
    ids=["flatten", "reshape", "identity"],
)
def test_teacher_softmax_then_reshape_is_probabilities(tmp_path, ending) -> None:
    from dslo_edge.push_checks import check_output_kinds

    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), *ending])

    manifest = convert_bundle(teacher, student, tmp_path / "bundle")

    bundle = load_bundle(tmp_path / "bundle")
    assert manifest["teacher"]["output_kind"] == "probabilities"
    # The hub reads the kind from the teacher's output op in the same way.
    check_output_kinds(
        bundle.teacher_path.read_bytes(),
        {"output": bundle.teacher_output_kind},
        "teacher.tflite",
        "the manifest",
    )


def test_channels_first_flatten_is_rejected(tmp_path) -> None:
    student = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.Conv2D(3, 1),
            keras.layers.Flatten(data_format="channels_first", name="flat"),
            keras.layers.Dense(3),
        ]
    )
    teacher = keras.Sequential(
        [keras.Input((4, 4, 2)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )

    with pytest.raises(ConversionError, match="'flat'.*channels_first.*channels_last"):
        convert_bundle(teacher, student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_channels_first_flatten_of_vectors_is_read() -> None:
    # Flatten leaves (batch, features) inputs unchanged in either data format.
    student = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Flatten(data_format="channels_first", name="flat"),
            keras.layers.Dense(3),
        ]
    )

    graph = read_student(student)

    assert graph.node("flat").op == "reshape"
    assert graph.node("flat").output_shape == (6,)


@pytest.mark.parametrize(
    ("ending", "message"),
    [
        (
            [keras.layers.Dense(3, activation="sigmoid", name="out")],
            "output 'out' gives sigmoid values \\(layer 'out'\\), not logits",
        ),
        (
            [
                keras.layers.Dense(3, name="scores"),
                keras.layers.Activation("softmax", name="probs"),
                keras.layers.Dropout(0.1, name="out"),
            ],
            "output 'out' gives softmax values \\(layer 'probs'\\), not logits",
        ),
    ],
)
def test_activation_before_head_is_rejected(tmp_path, ending, message) -> None:
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), *ending])
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])

    with pytest.raises(ConversionError, match=message):
        convert_bundle(teacher, student, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    "ending",
    [
        [keras.layers.Activation("linear", name="out")],
        [keras.layers.Activation("linear"), keras.layers.Softmax(name="out")],
    ],
)
def test_linear_activation_head_converts(tmp_path, ending) -> None:
    student = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, name="scores"), *ending]
    )
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)

    convert_bundle(teacher, student, tmp_path / "bundle")

    model = StudentModel(load_bundle(tmp_path / "bundle"))
    expected = np.asarray(student(x))
    if isinstance(ending[-1], keras.layers.Softmax):
        actual = model.infer(x)
    else:
        actual = model.logits(x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_existing_output_is_not_overwritten(mlp_pair, tmp_path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("user data")

    with pytest.raises(ConversionError, match="not empty"):
        convert_bundle(mlp_pair.teacher, mlp_pair.student, out)
    assert (out / "keep.txt").read_text() == "user data"


def test_class_count_mismatch_is_rejected(mlp_pair, tmp_path) -> None:
    teacher = keras.Sequential([keras.Input((64,)), keras.layers.Dense(7)])

    with pytest.raises(ConversionError, match="7 classes.*10"):
        convert_bundle(teacher, mlp_pair.student, tmp_path / "bundle")


def test_device_modules_do_not_import_tensorflow() -> None:
    # Runs in a fresh interpreter because this test process has TensorFlow.
    import subprocess
    import sys

    code = (
        "import sys, dslo_edge.daemon, dslo_edge.hub, dslo_edge.cli;"
        "print('tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.stdout.strip() == "False"
