"""Multi-head trainer on a converted two-head student: loss, alphas, checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.checkpoint import load_latest_checkpoint, save_checkpoint
from dslo_edge.config import TrainingSettings, load_config, render_config
from dslo_edge.dynamic import TaskSettings
from dslo_edge.errors import ConfigError, InvalidUpdate
from dslo_edge.models import StudentModel
from dslo_edge.multihead import MultiHeadTrainer, make_trainer
from dslo_edge.multihead_model import MultiHeadStudentModel, load_student
from dslo_edge.multihead_protocol import encode_multi_head_update, head_update
from dslo_edge.multitask import MultiTaskEngine
from dslo_edge.protocol import encode_update, label_probabilities
from dslo_edge.softlabels import AlphaPolicy, Schedule
from dslo_edge.trainer import Trainer
from tests.multihead_bundle import HEADS, make_multi_head_update
from tests.test_daemon import make_update

pytestmark = pytest.mark.slow

STATIC_DIGIT = TaskSettings(
    alpha=AlphaPolicy(0.9, 0.9, 0.7, 0.3, Schedule("constant")), weight=1.0
)
STATIC_SHAPE = TaskSettings(
    alpha=AlphaPolicy(0.3, 0.3, 0.7, 0.3, Schedule("constant")),
    temperature=4.0,
    weight=0.5,
)


def _trainer(bundle: Path, **tasks: TaskSettings) -> MultiHeadTrainer:
    student = load_student(load_bundle(bundle))
    trainer = make_trainer(student, TrainingSettings(learning_rate=0.1, tasks=tasks))
    assert isinstance(trainer, MultiHeadTrainer)
    return trainer


def _decoded(trainer: MultiHeadTrainer, seed: int, **changes: object):
    update = make_multi_head_update(seed, **changes)
    return trainer.decode(encode_multi_head_update(update))


def test_student_infers_each_head(two_head_bundle: Path) -> None:
    student = load_student(load_bundle(two_head_bundle))
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)

    probabilities = student.infer(x)
    logits = student.logits(x)

    assert isinstance(student, MultiHeadStudentModel)
    assert list(probabilities) == ["digit", "shape"]
    for name, classes in HEADS.items():
        assert probabilities[name].shape == (5, classes)
        np.testing.assert_allclose(probabilities[name].sum(axis=1), 1.0, atol=1e-5)
        shifted = logits[name] - logits[name].max(axis=1, keepdims=True)
        softmax = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(probabilities[name], softmax, atol=1e-6)


def test_update_loss_matches_engine(two_head_bundle: Path) -> None:
    tasks = {"digit": STATIC_DIGIT, "shape": STATIC_SHAPE}
    trainer = _trainer(two_head_bundle, **tasks)
    twin = MultiTaskEngine(tasks, trainer.settings.progress_settings())
    update = _decoded(trainer, seed=1)
    before = trainer.student.get_weights()
    logits = trainer.student.logits(update.inputs)
    targets = twin.prepare(
        update.sample_ids,
        {name: _probabilities(trainer, update, name) for name in ("digit", "shape")},
        update.teacher_round,
        {name: head.hard_labels for name, head in update.heads.items()},
        {name: head.temperature for name, head in update.heads.items()},
    )
    expected, _ = twin.loss(logits, targets)

    result = trainer.apply(update)
    after = trainer.student.get_weights()

    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.samples == 8
    assert trainer.applied_updates == 1
    for name in ("trunk_kernel", "digit_kernel", "shape_kernel"):
        assert np.max(np.abs(after[name] - before[name])) > 1e-6, name


def _probabilities(trainer: MultiHeadTrainer, update, name: str) -> np.ndarray:

    return label_probabilities(
        head_update(update, name), trainer.tasks[name].temperature
    )


def test_heads_get_their_own_alpha(two_head_bundle: Path) -> None:
    trainer = _trainer(two_head_bundle, digit=STATIC_DIGIT, shape=STATIC_SHAPE)
    update = _decoded(trainer, seed=2)

    targets = trainer.prepare(update)
    result = trainer.apply(_decoded(trainer, seed=3))

    np.testing.assert_allclose(targets["digit"].alpha, 0.9, atol=1e-6)
    np.testing.assert_allclose(targets["shape"].alpha, 0.3, atol=1e-6)
    # The update's own temperature (3.0) wins over the head default (4.0).
    assert targets["shape"].temperature == 3.0
    assert targets["digit"].temperature == 2.0
    assert trainer.engine.weights == {"digit": 1.0, "shape": 0.5}
    assert result.min_alpha == pytest.approx(0.3)
    assert result.max_alpha == pytest.approx(0.9)
    assert result.mean_alpha == pytest.approx(0.6)


def test_config_tables_set_head_tasks(two_head_bundle: Path, tmp_path: Path) -> None:
    text = render_config(
        "two-head",
        two_head_bundle,
        tmp_path / "state",
        1883,
        overrides={
            "training.tasks.shape": {"weight": 0.25, "temperature": 5.0},
            "training.tasks.shape.alpha": {"start": 0.4, "schedule": "constant"},
        },
    )
    (tmp_path / "device.toml").write_text(text)
    config = load_config(tmp_path / "device.toml")

    trainer = make_trainer(load_student(load_bundle(two_head_bundle)), config.training)

    assert isinstance(trainer, MultiHeadTrainer)
    shape = trainer.tasks["shape"]
    assert shape.weight == 0.25
    assert shape.temperature == 5.0
    assert shape.alpha.alpha_start == 0.4
    assert shape.alpha.alpha_end == 0.2  # the device-wide [alpha] end
    assert shape.alpha.schedule.kind == "constant"
    assert trainer.tasks["digit"] == config.training.task()


def test_config_with_unknown_head_rejected(two_head_bundle: Path) -> None:
    settings = TrainingSettings(tasks={"colour": TaskSettings()})
    student = load_student(load_bundle(two_head_bundle))

    with pytest.raises(ConfigError) as raised:
        make_trainer(student, settings)

    assert "[training.tasks.colour] names head 'colour'" in str(raised.value)
    assert "its heads are: digit, shape" in str(raised.value)


def test_all_zero_head_weights_rejected(two_head_bundle: Path) -> None:
    frozen = TaskSettings(weight=0.0)
    settings = TrainingSettings(tasks={"digit": frozen, "shape": frozen})
    student = load_student(load_bundle(two_head_bundle))

    with pytest.raises(ConfigError) as raised:
        make_trainer(student, settings)

    message = str(raised.value)
    assert message.startswith(f"every head of the student in {two_head_bundle}")
    assert "give at least one head a weight above 0" in message
    one_frozen = TrainingSettings(tasks={"shape": frozen})
    assert make_trainer(student, one_frozen).tasks["digit"].weight == 1.0


def test_single_head_student_rejects_task_tables(mlp_pair) -> None:
    settings = TrainingSettings(tasks={"digit": TaskSettings()})
    student = load_student(load_bundle(mlp_pair.bundle))

    with pytest.raises(ConfigError, match="none, because it has one output"):
        make_trainer(student, settings)


def test_updates_with_wrong_heads_rejected(two_head_bundle: Path) -> None:
    trainer = _trainer(two_head_bundle)
    missing = make_multi_head_update(4)
    del missing.heads["shape"]
    wrong_classes = make_multi_head_update(5)
    wrong_classes.heads["shape"].labels = np.zeros((8, 4), dtype=np.float32)

    with pytest.raises(InvalidUpdate) as missing_error:
        trainer.decode(encode_multi_head_update(missing))
    with pytest.raises(InvalidUpdate) as classes_error:
        trainer.decode(encode_multi_head_update(wrong_classes))
    with pytest.raises(InvalidUpdate) as single_error:
        trainer.decode(encode_update(make_update(6)))

    assert missing_error.value.reason == "shape_mismatch"
    assert "no labels for head 'shape'" in str(missing_error.value)
    assert classes_error.value.reason == "shape_mismatch"
    assert "head 'shape'" in str(classes_error.value)
    assert "the model expects 3 classes" in str(classes_error.value)
    assert single_error.value.reason == "shape_mismatch"
    assert "single-head update (format version 1)" in str(single_error.value)
    assert single_error.value.message_id is not None


def test_single_head_trainer_rejects_heads(mlp_pair) -> None:
    trainer = Trainer(StudentModel(load_bundle(mlp_pair.bundle)), TrainingSettings())

    with pytest.raises(InvalidUpdate) as raised:
        trainer.decode(encode_multi_head_update(make_multi_head_update(7)))

    assert raised.value.reason == "shape_mismatch"
    assert "multi-head update (format version 3)" in str(raised.value)
    assert raised.value.message_id is not None


def test_checkpoint_restores_head_state(two_head_bundle: Path, tmp_path: Path) -> None:
    trainer = _trainer(two_head_bundle, digit=STATIC_DIGIT, shape=STATIC_SHAPE)
    first_round = make_multi_head_update(8)
    # Other labels for the same ids in round 2 give each head a drift figure.
    second_round = make_multi_head_update(18, teacher_round=2)
    second_round.sample_ids = first_round.sample_ids
    for update in (first_round, second_round):
        trainer.apply(trainer.decode(encode_multi_head_update(update)))
    tensors, state = trainer.checkpoint_content()
    save_checkpoint(tmp_path, tensors, state)

    restored = _trainer(two_head_bundle, digit=STATIC_DIGIT, shape=STATIC_SHAPE)
    restored.restore(load_latest_checkpoint(tmp_path))

    assert "tasks/digit/smoothing/rows" in tensors
    assert "tasks/shape/monitor/rows" in tensors
    assert restored.applied_updates == 2
    for name in ("digit", "shape"):
        before = trainer.engine.engines[name]
        after = restored.engine.engines[name]
        assert after.store.to_arrays()[0] == before.store.to_arrays()[0]
        np.testing.assert_array_equal(
            after.store.to_arrays()[1], before.store.to_arrays()[1]
        )
        restored_figures = after.monitor.snapshot()
        saved_figures = before.monitor.snapshot()
        # Last-batch figures are not saved, as for a single-head student.
        for figure in ("mean_entropy", "mean_confidence", "drift", "latest_round"):
            assert restored_figures[figure] == saved_figures[figure], figure
        assert restored_figures["drift"] > 0.01
        assert restored_figures["latest_round"] == 2
    next_update = make_multi_head_update(9)
    payload = encode_multi_head_update(next_update)
    first = trainer.apply(trainer.decode(payload))
    second = restored.apply(restored.decode(payload))
    assert second.loss == first.loss
    assert second.mean_alpha == first.mean_alpha


def test_apply_many_counts_every_update(two_head_bundle: Path) -> None:
    trainer = _trainer(two_head_bundle)
    updates = [_decoded(trainer, seed=10), _decoded(trainer, seed=11)]
    updates.append(_decoded(trainer, seed=12))
    updates[2].heads["shape"].temperature = 1.5
    before = trainer.student.get_weights()

    results = trainer.apply_many(updates, batch_size=16)

    assert [result.samples for result in results] == [8, 8, 8]
    assert trainer.applied_updates == 3
    assert trainer.progress == pytest.approx(3 / 1000)
    assert all(np.isfinite(result.loss) for result in results)
    after = trainer.student.get_weights()
    assert np.max(np.abs(after["trunk_kernel"] - before["trunk_kernel"])) > 1e-6


def test_task_tables_are_optional() -> None:
    settings = TrainingSettings()

    assert settings.head_task("digit") == settings.task()
    assert dataclasses.replace(settings, tasks={}).tasks == {}
