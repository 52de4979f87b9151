"""Bundle precision options, the manifest record and ``dslo-edge inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from converters.bundle import PrecisionOptions, convert_bundle, load_keras_model
from converters.optimizers import OptimizerConfig
from converters.trainable import TrainableScope
from dslo_edge.bundle import load_bundle
from dslo_edge.cli import EXIT_CONFIG, main
from dslo_edge.errors import ConversionError
from dslo_edge.footprint import estimate_memory
from dslo_edge.inspect import inspect_bundle
from dslo_edge.models import StudentModel, TeacherModel

keras = pytest.importorskip("keras")
layers = keras.layers

INPUT_SHAPE = (8, 8, 3)


def _student() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem"),
            layers.BatchNormalization(name="stem_norm"),
            layers.ReLU(6.0),
            layers.GlobalAveragePooling2D(),
            layers.Dense(256, activation="relu", name="hidden"),
            layers.Dense(4, activation="softmax", name="logits"),
        ]
    )


def _teacher() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Conv2D(32, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(4, activation="softmax"),
        ]
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A float32 bundle and one with every precision option switched on."""
    keras.utils.set_random_seed(11)
    folder = tmp_path_factory.mktemp("bundles")
    student, teacher = _student(), _teacher()
    samples = np.random.default_rng(0).random((64, *INPUT_SHAPE), np.float32)
    plain = folder / "plain"
    convert_bundle(teacher, student, plain)
    mixed = folder / "mixed"
    convert_bundle(
        teacher,
        student,
        mixed,
        optimizer=OptimizerConfig("adamw", clip_global_norm=1.0),
        trainable=TrainableScope.parse("from:hidden"),
        precision=PrecisionOptions(
            student="float16",
            teacher="int8",
            int8_student_copy=True,
            representative_data=samples,
        ),
    )
    return SimpleNamespace(
        plain=plain, mixed=mixed, samples=samples, student=student, teacher=teacher
    )


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.slow
def test_manifest_records_precision_per_file(bundles: SimpleNamespace) -> None:
    manifest = _manifest(bundles.mixed)

    assert manifest["student"]["precision"] == "float16"
    assert manifest["student"]["constant_bytes"]["FLOAT16"] >= 256 * 16 * 2
    assert manifest["teacher"]["precision"] == "int8"
    assert manifest["teacher"]["constant_bytes"]["INT8"] > 0
    assert manifest["student_int8"]["precision"] == "int8"
    assert manifest["student_int8"]["output_kind"] == "probabilities"
    assert _manifest(bundles.plain)["student"]["precision"] == "float32"


@pytest.mark.slow
def test_float16_student_halves_weights_and_trains(bundles: SimpleNamespace) -> None:
    plain = _manifest(bundles.plain)["student"]["constant_bytes"]
    mixed = _manifest(bundles.mixed)["student"]["constant_bytes"]
    kernel_bytes = 16 * 256 * 4
    assert plain["FLOAT32"] - mixed.get("FLOAT32", 0) >= kernel_bytes
    assert mixed["FLOAT16"] >= kernel_bytes // 2

    model = StudentModel(load_bundle(bundles.mixed))
    x = bundles.samples[:16]
    soft = model.infer(x)
    hard = np.argmax(soft, axis=1).astype(np.int32)
    alpha = np.full(16, 0.5, np.float32)
    losses = [model.train_step(x, soft * 0.5 + 0.125, hard, alpha, 2.0, 0.05)]
    for _ in range(20):
        losses.append(model.train_step(x, soft * 0.5 + 0.125, hard, alpha, 2.0, 0.05))
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_int8_files_agree_with_float_models(bundles: SimpleNamespace) -> None:
    manifest = _manifest(bundles.mixed)
    x = bundles.samples
    teacher = TeacherModel(bundles.mixed / "teacher.tflite", "probabilities")
    copy = TeacherModel(
        bundles.mixed / manifest["student_int8"]["file"], "probabilities"
    )

    expected_teacher = bundles.teacher(x, training=False).numpy()
    expected_student = bundles.student(x, training=False).numpy()
    assert np.abs(teacher.predict(x) - expected_teacher).max() < 0.05
    assert np.abs(copy.predict(x) - expected_student).max() < 0.05


@pytest.mark.slow
def test_manifest_records_optimizer_and_state(bundles: SimpleNamespace) -> None:
    student = _manifest(bundles.mixed)["student"]
    variables = student["variables"]

    assert student["optimizer"]["name"] == "adamw"
    assert student["optimizer"]["clip_global_norm"] == 1.0
    assert student["trainable"] == {
        "scope": "from:hidden",
        "layers": ["hidden", "logits"],
    }
    assert variables["stem_kernel"]["kind"] == "frozen"
    assert variables["hidden_kernel"]["kind"] == "trained"
    assert variables["optimizer__m__hidden_kernel"]["kind"] == "optimizer_state"
    assert variables["stem_norm_moving_mean"]["kind"] == "moving_statistic"
    assert set(student["weights"]) == set(variables)


def test_memory_estimate_counts_conv_activations(bundles: SimpleNamespace) -> None:
    memory = estimate_memory(load_bundle(bundles.plain), batch_size=32, queue_size=1)
    # The stem's output, its batch norm and ReLU6: 32 x 8 x 8 x 16 floats each.
    stem_output = 32 * 8 * 8 * 16 * 4

    assert memory.activations >= 3 * stem_output


def test_int8_trainable_student_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="int8 trainable student.*float32"):
        convert_bundle(
            _teacher(),
            _student(),
            tmp_path / "bundle",
            precision=PrecisionOptions(student="int8"),
        )
    assert not (tmp_path / "bundle").exists()


def test_int8_without_samples_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="representative dataset"):
        convert_bundle(
            _teacher(),
            _student(),
            tmp_path / "bundle",
            precision=PrecisionOptions(teacher="int8"),
        )


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (np.zeros((4, 64), np.float32), r"shape \(4, 64\).*\(N, 8, 8, 3\)"),
        (np.zeros((0, 8, 8, 3), np.float32), "no samples"),
        (np.full((4, 8, 8, 3), np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_bad_representative_data_rejected(tmp_path: Path, samples, message) -> None:
    with pytest.raises(ConversionError, match=f"representative data.*{message}"):
        convert_bundle(
            _teacher(),
            _student(),
            tmp_path / "bundle",
            precision=PrecisionOptions(
                int8_student_copy=True, representative_data=samples
            ),
        )
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (layers.Conv1D(2, 3, name="temporal"), "'temporal' of type Conv1D.*Conv2D"),
        (layers.Activation("elu", name="smooth"), "'smooth'.*'elu'"),
        (layers.Dropout(0.2, noise_shape=(None, 1, 1), name="drop"), "noise_shape"),
    ],
)
def test_unsupported_layer_names_the_fix(
    tmp_path: Path, layer: keras.layers.Layer, message: str
) -> None:
    student = keras.Sequential(
        [keras.Input((8, 4)), layer, layers.Flatten(), layers.Dense(3)]
    )
    teacher = keras.Sequential([keras.Input((8, 4)), layers.Flatten(), layers.Dense(3)])

    with pytest.raises(ConversionError, match=message):
        convert_bundle(teacher, student, tmp_path / "bundle")


@pytest.mark.slow
def test_inspect_reports_ops_variables_memory(bundles: SimpleNamespace) -> None:
    report = inspect_bundle(bundles.mixed, batch_size=16)
    student = report["files"]["student"]

    assert report["flex_free"] is True
    assert set(report["files"]) == {"student", "teacher", "student_int8"}
    assert student["op_counts"]["train"]["ASSIGN_VARIABLE"] > 0
    assert student["op_counts"]["infer"]["CONV_2D"] == 1
    assert student["variables"]["hidden_kernel"]["bytes"] == 16 * 256 * 4
    assert (
        student["memory_estimate_bytes"] > student["bytes"] + student["variable_bytes"]
    )


@pytest.mark.slow
def test_inspect_command_prints_summary(bundles: SimpleNamespace) -> None:
    result = CliRunner().invoke(main, ["inspect", str(bundles.mixed), "--variables"])

    assert result.exit_code == 0, result.output
    assert "Flex-free: yes" in result.output
    assert "signature train:" in result.output
    assert "optimizer: adamw" in result.output
    assert "optimizer__v__logits_kernel" in result.output
    assert "runtime memory estimate at batch 32" in result.output


def test_recurrent_teacher_names_unroll(tmp_path) -> None:
    teacher = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Reshape((4, 2)),
            keras.layers.GRU(3, name="memory"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])

    with pytest.raises(ConversionError) as raised:
        convert_bundle(teacher, student, tmp_path / "bundle")

    message = str(raised.value)
    assert "the teacher has a recurrent layer" in message
    assert "memory" in message
    assert "set unroll=True" in message
    assert not (tmp_path / "bundle").exists()


def test_flex_only_teacher_names_the_op(tmp_path: Path) -> None:
    import tensorflow as tf

    from converters.bundle import convert_teacher

    teacher = keras.Sequential(
        [
            keras.Input((4,)),
            layers.Lambda(lambda v: tf.math.cumprod(v, axis=1)),
            layers.Dense(3),
        ]
    )

    with pytest.raises(ConversionError, match="only with Flex: Cumprod; remove"):
        convert_teacher(teacher, tmp_path / "teacher.tflite")
    assert not (tmp_path / "teacher.tflite").exists()


def test_damaged_keras_file_is_named(tmp_path: Path) -> None:
    damaged = tmp_path / "teacher.keras"
    damaged.write_bytes(b"not a zip archive")

    result = CliRunner().invoke(
        main,
        ["convert", "--teacher", str(damaged), "--student", str(damaged)]
        + ["--out", str(tmp_path / "bundle")],
    )

    assert result.exit_code == EXIT_CONFIG
    assert f"invalid --teacher {damaged}: the file is not a zip archive" in (
        result.output
    )
    assert "File not found" not in result.output
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(ConversionError, match="the file is not a zip archive"):
        load_keras_model(damaged)


def test_lambda_model_file_names_safe_mode(tmp_path: Path) -> None:
    path = tmp_path / "teacher.keras"
    keras.Sequential(
        [keras.Input((4,)), layers.Lambda(lambda v: v * 2), layers.Dense(3)]
    ).save(path)

    with pytest.raises(ConversionError) as raised:
        load_keras_model(path)

    message = str(raised.value)
    assert message.startswith(f"cannot load Keras model {path}: ")
    assert "`Lambda` layer whose `function` is a Python lambda" in message
    assert "convert loads models in Keras's safe mode" in message
    assert "replace the Lambda layer with built-in layers" in message
    assert "expected a .keras file written by model.save()" not in message


def test_custom_layer_file_names_class(tmp_path: Path) -> None:
    @keras.saving.register_keras_serializable(package="tests")
    class Scale(layers.Layer):
        def call(self, inputs):  # type: ignore[no-untyped-def]
            return inputs * 2.0

    path = tmp_path / "student.keras"
    keras.Sequential([keras.Input((4,)), Scale(), layers.Dense(3)]).save(path)
    keras.saving.get_custom_objects().pop("tests>Scale")

    with pytest.raises(ConversionError) as raised:
        load_keras_model(path)

    message = str(raised.value)
    assert message.startswith(f"cannot load Keras model {path}: ")
    assert "custom class 'Scale'" in message
    assert "supports only these layers: InputLayer, Dense" in message
    assert "import the module that defines the class" in message
    assert "Full object config" not in message


@pytest.mark.slow
def test_softmax_layer_output_is_probabilities(tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    teacher = keras.Sequential(
        [keras.Input((6,)), layers.Dense(8, activation="relu"), layers.Dense(3)]
    )
    teacher.add(layers.Softmax())
    student = keras.Sequential(
        [keras.Input((6,)), layers.Dense(3), layers.Softmax(name="probs")]
    )
    samples = np.random.default_rng(3).random((16, 6), np.float32)
    precision = PrecisionOptions(int8_student_copy=True, representative_data=samples)

    manifest = convert_bundle(teacher, student, tmp_path / "b", precision=precision)

    assert manifest["teacher"]["output_kind"] == "probabilities"
    assert manifest["student_int8"]["output_kind"] == "probabilities"
    bundle = load_bundle(tmp_path / "b")
    labels = TeacherModel(bundle.teacher_path, bundle.teacher_output_kind)
    np.testing.assert_allclose(labels.predict(samples).sum(axis=1), 1.0, atol=1e-5)
