"""Students with several output heads: conversion, train parity, inference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from converters.bundle import convert_bundle  # noqa: E402
from converters.student_graph import weight_name  # noqa: E402
from dslo_edge.bundle import load_bundle  # noqa: E402
from dslo_edge.dynamic import Targets, TaskSettings  # noqa: E402
from dslo_edge.errors import BundleError, ConversionError  # noqa: E402
from dslo_edge.modelfile import flex_ops, signature_ops  # noqa: E402
from dslo_edge.multitask import MultiTaskEngine  # noqa: E402
from dslo_edge.runtime import load_interpreter  # noqa: E402

HEADS = {"digit": 10, "shape": 3}
TEMPERATURES = {"digit": 2.0, "shape": 4.0}
TASK_WEIGHTS = {"digit": 1.0, "shape": 0.5}
LEARNING_RATE = 0.1


@dataclass
class MultiHeadPair:
    """A two-head Keras student and teacher and their converted bundle."""

    student: Any
    teacher: Any
    bundle: Path


def _student() -> Any:
    # Shared trunk; "digit" ends in logits, "shape" in a softmax.
    x = keras.Input((64,))
    trunk = keras.layers.Dense(32, activation="relu", name="trunk")(x)
    digit = keras.layers.Dense(HEADS["digit"], name="digit")(trunk)
    shape = keras.layers.Dense(HEADS["shape"], activation="softmax", name="shape")(
        trunk
    )
    return keras.Model(x, [digit, shape])


def _teacher(heads: dict[str, int]) -> Any:
    x = keras.Input((64,))
    hidden = keras.layers.Dense(48, activation="tanh")(x)
    outputs = [
        keras.layers.Dense(classes, activation="softmax", name=name)(hidden)
        for name, classes in heads.items()
    ]
    return keras.Model(x, outputs)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> MultiHeadPair:
    keras.utils.set_random_seed(11)
    student = _student()
    teacher = _teacher(HEADS)
    bundle = tmp_path_factory.mktemp("multitask") / "bundle"
    convert_bundle(teacher, student, bundle)
    return MultiHeadPair(student, teacher, bundle)


def _runner(bundle: Path, signature: str) -> Any:
    interpreter = load_interpreter(bundle / "student.tflite")
    return interpreter.get_signature_runner(signature)


def _batch(size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {"x": rng.normal(size=(size, 64)).astype(np.float32)}
    for name, classes in HEADS.items():
        hard = rng.integers(0, classes, size=size).astype(np.int32)
        hard[::3] = -1  # every third sample has no hard label
        batch[f"soft_{name}"] = rng.dirichlet(np.ones(classes), size=size).astype(
            np.float32
        )
        batch[f"hard_{name}"] = hard
        batch[f"alpha_{name}"] = rng.uniform(0.2, 0.8, size=size).astype(np.float32)
    return batch


def _train_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = dict(batch)
    for name in HEADS:
        inputs[f"temperature_{name}"] = np.float32(TEMPERATURES[name])
        inputs[f"weight_{name}"] = np.float32(TASK_WEIGHTS[name])
    inputs["learning_rate"] = np.float32(LEARNING_RATE)
    return inputs


def _logits_model(student: Any) -> Any:
    """A copy of the student whose heads all output logits."""
    copy = keras.models.clone_model(student)
    copy.set_weights(student.get_weights())
    copy.get_layer("shape").activation = keras.activations.linear
    return copy


def _head_loss(z: Any, batch: dict[str, np.ndarray], name: str) -> Any:
    t = TEMPERATURES[name]
    soft = tf.constant(batch[f"soft_{name}"])
    alpha = tf.constant(batch[f"alpha_{name}"])
    kl = tf.reduce_sum(
        tf.math.xlogy(soft, soft) - soft * tf.nn.log_softmax(z / t), axis=-1
    )
    one_hot = tf.one_hot(batch[f"hard_{name}"], HEADS[name])  # -1 gives a zero row
    ce = -tf.reduce_sum(one_hot * tf.nn.log_softmax(z), axis=-1)
    return tf.reduce_mean(alpha * t * t * kl + (1.0 - alpha) * ce)


def _tensorflow_step(
    student: Any, batch: dict[str, np.ndarray]
) -> tuple[float, dict[str, np.ndarray]]:
    """One SGD step of the weighted loss with TensorFlow's own autodiff."""
    model = _logits_model(student)
    with tf.GradientTape() as tape:
        digit, shape = model(tf.constant(batch["x"]))
        loss = TASK_WEIGHTS["digit"] * _head_loss(digit, batch, "digit")
        loss += TASK_WEIGHTS["shape"] * _head_loss(shape, batch, "shape")
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    grad_of = {id(v): g for v, g in zip(variables, grads, strict=True)}
    updated = {}
    for layer in model.layers:
        for variable in layer.trainable_variables:
            name = weight_name(layer.name, variable.name)
            updated[name] = (variable - LEARNING_RATE * grad_of[id(variable)]).numpy()
    return float(loss), updated


def test_bundle_is_flex_free(pair: MultiHeadPair) -> None:
    manifest = json.loads((pair.bundle / "manifest.json").read_text())
    model = (pair.bundle / "student.tflite").read_bytes()

    assert flex_ops(signature_ops(model)) == []
    assert manifest["runtime"]["flex"] is False
    assert set(manifest["student"]["signatures"]) == {
        "infer",
        "train",
        "get_weights",
        "set_weights",
    }


def test_manifest_lists_heads(pair: MultiHeadPair) -> None:
    manifest = json.loads((pair.bundle / "manifest.json").read_text())

    assert manifest["heads"] == [
        {
            "name": "digit",
            "class_count": 10,
            "output_kind": "logits",
            "teacher_output_kind": "probabilities",
        },
        {
            "name": "shape",
            "class_count": 3,
            "output_kind": "probabilities",
            "teacher_output_kind": "probabilities",
        },
    ]
    assert "class_count" not in manifest
    assert manifest["teacher"]["output_kinds"] == {
        "digit": "probabilities",
        "shape": "probabilities",
    }


def test_signature_tensor_names(pair: MultiHeadPair) -> None:
    signatures = json.loads((pair.bundle / "manifest.json").read_text())["student"][
        "signatures"
    ]
    per_head = ("soft", "hard", "alpha", "temperature", "weight")
    expected_inputs = {"x", "learning_rate"} | {
        f"{field}_{name}" for field in per_head for name in HEADS
    }

    assert set(signatures["train"]["inputs"]) == expected_inputs
    assert set(signatures["train"]["outputs"]) == {"loss", "loss_digit", "loss_shape"}
    assert signatures["train"]["inputs"]["soft_shape"]["shape"] == [-1, 3]
    assert signatures["train"]["inputs"]["hard_digit"]["dtype"] == "int32"
    assert signatures["train"]["inputs"]["weight_digit"]["shape"] == []
    assert set(signatures["infer"]["outputs"]) == {
        "logits_digit",
        "probabilities_digit",
        "logits_shape",
        "probabilities_shape",
    }


def test_infer_matches_keras_predict(pair: MultiHeadPair) -> None:
    x = np.random.default_rng(1).normal(size=(7, 64)).astype(np.float32)
    outputs = _runner(pair.bundle, "infer")(x=x)
    probabilities = pair.student.predict(x, verbose=0)
    logits = _logits_model(pair.student).predict(x, verbose=0)

    for i, name in enumerate(HEADS):
        np.testing.assert_allclose(
            outputs[f"logits_{name}"], logits[i], rtol=0, atol=1e-5
        )
    np.testing.assert_allclose(
        outputs["probabilities_digit"],
        tf.nn.softmax(logits[0]).numpy(),
        rtol=0,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        outputs["probabilities_shape"], probabilities[1], rtol=0, atol=1e-5
    )


def test_teacher_file_outputs_each_head(pair: MultiHeadPair) -> None:
    x = np.random.default_rng(2).normal(size=(5, 64)).astype(np.float32)
    interpreter = load_interpreter(pair.bundle / "teacher.tflite")
    outputs = interpreter.get_signature_runner("infer")(x=x)
    expected = pair.teacher.predict(x, verbose=0)

    assert set(outputs) == {"output_digit", "output_shape"}
    for i, name in enumerate(HEADS):
        np.testing.assert_allclose(
            outputs[f"output_{name}"], expected[i], rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("batch_size", [1, 16])
def test_train_step_matches_tensorflow(pair: MultiHeadPair, batch_size: int) -> None:
    interpreter = load_interpreter(pair.bundle / "student.tflite")
    before = interpreter.get_signature_runner("get_weights")()
    batch = _batch(batch_size, seed=batch_size)

    result = interpreter.get_signature_runner("train")(**_train_inputs(batch))
    after = interpreter.get_signature_runner("get_weights")()
    expected_loss, expected_weights = _tensorflow_step(pair.student, batch)

    assert float(result["loss"]) == pytest.approx(expected_loss, rel=1e-4)
    assert set(after) == set(expected_weights)
    for name, reference in expected_weights.items():
        step = after[name] - before[name]
        reference_step = reference - before[name]
        error = np.max(np.abs(step - reference_step))
        assert error <= 1e-4 * np.max(np.abs(reference_step)), name


def test_loss_matches_numpy_engine(pair: MultiHeadPair) -> None:
    batch = _batch(16, seed=5)
    logits = _runner(pair.bundle, "infer")(x=batch["x"])
    engine = MultiTaskEngine(
        {name: TaskSettings(weight=TASK_WEIGHTS[name]) for name in HEADS}
    )
    targets = {
        name: Targets(
            soft=batch[f"soft_{name}"],
            hard=batch[f"hard_{name}"],
            alpha=batch[f"alpha_{name}"],
            temperature=TEMPERATURES[name],
            smoothing_lambda=0.0,
            progress=0.0,
            batch_drift=None,
            dynamic_ms=0.0,
        )
        for name in HEADS
    }
    expected, _ = engine.loss(
        {name: logits[f"logits_{name}"] for name in HEADS}, targets
    )

    result = _runner(pair.bundle, "train")(**_train_inputs(batch))

    assert float(result["loss"]) == pytest.approx(expected, rel=1e-5)
    weighted = sum(TASK_WEIGHTS[n] * float(result[f"loss_{n}"]) for n in HEADS)
    assert weighted == pytest.approx(expected, rel=1e-5)


def test_zero_weight_leaves_head_untouched(pair: MultiHeadPair) -> None:
    interpreter = load_interpreter(pair.bundle / "student.tflite")
    before = interpreter.get_signature_runner("get_weights")()
    inputs = _train_inputs(_batch(8, seed=3))
    inputs["weight_shape"] = np.float32(0.0)

    interpreter.get_signature_runner("train")(**inputs)
    after = interpreter.get_signature_runner("get_weights")()

    np.testing.assert_array_equal(after["shape_kernel"], before["shape_kernel"])
    np.testing.assert_array_equal(after["shape_bias"], before["shape_bias"])
    assert np.max(np.abs(after["digit_kernel"] - before["digit_kernel"])) > 0


def test_bundle_model_spec_rejects_heads(pair: MultiHeadPair) -> None:
    bundle = load_bundle(pair.bundle)

    with pytest.raises(BundleError, match="several heads"):
        bundle.model_spec()


def test_teacher_without_matching_heads_rejected(tmp_path: Path) -> None:
    cases = {
        "other class count": {"digit": 10, "shape": 4},
        "other name": {"digit": 10, "form": 3},
        "missing head": {"digit": 10},
    }
    for case, heads in cases.items():
        teacher = _teacher(heads)
        with pytest.raises(ConversionError, match="student heads"):
            convert_bundle(teacher, _student(), tmp_path / case.replace(" ", "-"))


def test_overlong_head_name_rejected(tmp_path: Path) -> None:
    x = keras.Input((64,))
    trunk = keras.layers.Dense(8, activation="relu")(x)
    outputs = [
        keras.layers.Dense(3, name="h" * 70)(trunk),
        keras.layers.Dense(3, name="short")(trunk),
    ]
    student = keras.Model(x, outputs)

    with pytest.raises(ConversionError) as caught:
        convert_bundle(_teacher({"h" * 70: 3, "short": 3}), student, tmp_path / "b")

    assert "gives a head name of 70 bytes" in str(caught.value)
    assert "at most 64 bytes" in str(caught.value)
    assert not (tmp_path / "b").exists()


def test_more_heads_than_payloads_carry_rejected(tmp_path: Path) -> None:
    heads = {f"h{index}": 2 for index in range(33)}
    x = keras.Input((64,))
    trunk = keras.layers.Dense(8, activation="relu")(x)
    student = keras.Model(
        x, [keras.layers.Dense(2, name=name)(trunk) for name in heads]
    )

    with pytest.raises(ConversionError) as caught:
        convert_bundle(_teacher(heads), student, tmp_path / "b")

    assert "the student has 33 outputs" in str(caught.value)
    assert "at most 32 heads" in str(caught.value)
    assert not (tmp_path / "b").exists()


def test_non_ascii_head_name_rejected(tmp_path: Path) -> None:
    x = keras.Input((64,))
    trunk = keras.layers.Dense(8, activation="relu")(x)
    outputs = [
        keras.layers.Dense(3, name="größe")(trunk),
        keras.layers.Dense(3, name="short")(trunk),
    ]
    student = keras.Model(x, outputs)

    with pytest.raises(ConversionError) as caught:
        convert_bundle(_teacher({"größe": 3, "short": 3}), student, tmp_path / "b")

    assert "teacher's layer 'größe' has a name" in str(caught.value)
    assert "only ASCII letters, digits" in str(caught.value)
    assert not (tmp_path / "b").exists()


def test_trainer_rejects_multi_head_bundle(pair: MultiHeadPair) -> None:
    from dslo_edge.config import TrainingSettings
    from dslo_edge.models import StudentModel
    from dslo_edge.trainer import Trainer

    student = StudentModel(load_bundle(pair.bundle))

    with pytest.raises(BundleError, match="train it with .*MultiHeadTrainer"):
        Trainer(student, TrainingSettings())


def test_one_class_output_rejected(tmp_path: Path) -> None:
    # A softmax over one class is always 1, and updates carry 2 classes or more.
    x = keras.Input((64,))
    trunk = keras.layers.Dense(8, activation="relu")(x)
    several = keras.Model(
        x,
        [
            keras.layers.Dense(10, name="digit")(trunk),
            keras.layers.Dense(1, name="odd")(trunk),
        ],
    )
    single = keras.Model(x, keras.layers.Dense(1, name="odd")(trunk))
    cases = {
        "several": (several, _teacher({"digit": 10, "odd": 1})),
        "single": (single, _teacher({"odd": 1})),
    }

    for case, (student, teacher) in cases.items():
        with pytest.raises(ConversionError) as caught:
            convert_bundle(teacher, student, tmp_path / case)

        assert "output 'odd' has 1 class," in str(caught.value)
        assert "2 to 65535 classes" in str(caught.value)
        assert "Dense(2)" in str(caught.value)
        assert not (tmp_path / case).exists()


def test_same_output_layer_twice_rejected(tmp_path: Path) -> None:
    x = keras.Input((64,))
    trunk = keras.layers.Dense(8, activation="relu")(x)
    digit = keras.layers.Dense(10, name="digit")(trunk)
    student = keras.Model(x, [digit, digit])

    with pytest.raises(ConversionError) as caught:
        convert_bundle(_teacher({"digit": 10}), student, tmp_path / "b")

    assert "give the output of layer digit more than once" in str(caught.value)
    assert "list each output layer once" in str(caught.value)
    assert not (tmp_path / "b").exists()


def test_teacher_head_name_clash_rejected(tmp_path: Path) -> None:
    x = keras.Input((64,))
    hidden = keras.layers.Dense(8, activation="tanh")(x)
    teacher = keras.Model(
        x,
        [
            keras.layers.Dense(10, name="dig_it")(hidden),
            keras.layers.Dense(10, name="dig-it")(hidden),
        ],
    )

    with pytest.raises(ConversionError) as caught:
        convert_bundle(teacher, _student(), tmp_path / "b")

    assert "give the head names ['dig_it', 'dig_it']" in str(caught.value)
    assert "dig_it occurs more than once" in str(caught.value)
    assert not (tmp_path / "b").exists()
