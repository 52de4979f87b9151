"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dslo_edge.broker import Broker, amqtt_available, find_mosquitto

# MQTT brokers on 127.0.0.1, stopped at the end of each test.


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Return a function that starts brokers of a given kind, skipping if missing.

    Each broker gets its own directory under ``tmp_path``, which keeps its log
    for a failing test.
    """
    started: list[Broker] = []

    def start(
        kind: str = "auto", port: int | None = None, persistence: bool = False
    ) -> Broker:
        if kind == "mosquitto" and find_mosquitto() is None:
            pytest.skip("mosquitto not found on PATH or at /usr/sbin/mosquitto")
        if kind == "amqtt" and not amqtt_available():
            pytest.skip("amqtt is not installed")
        if kind == "auto" and find_mosquitto() is None and not amqtt_available():
            pytest.skip("no MQTT broker: neither mosquitto nor amqtt is installed")
        broker = Broker.start(
            port=port,
            kind=kind,
            workdir=tmp_path / f"broker-{len(started)}",
            persistence=persistence,
        )
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(broker_factory: Callable[..., Broker]) -> Broker:
    """Return a mosquitto broker on loopback, skipping when it is not installed."""
    return broker_factory("mosquitto")


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """A running broker: mosquitto when installed, else amqtt.

    Set DSLO_TEST_BROKER=amqtt (or mosquitto) to force one kind.
    """
    return broker_factory(os.environ.get("DSLO_TEST_BROKER", "auto"))


# A small converted bundle shared by the converter, trainer and daemon tests.


@dataclass
class ConvertedPair:
    """Keras teacher and student and the bundle converted from them."""

    teacher: Any
    student: Any
    bundle: Path


@pytest.fixture(scope="session")
def mlp_pair(tmp_path_factory: pytest.TempPathFactory) -> ConvertedPair:
    """Convert a 64-16-10 MLP student and a 64-32-10 teacher, both untrained."""
    keras = pytest.importorskip("keras")
    from converters.bundle import convert_bundle

    keras.utils.set_random_seed(7)
    student = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    teacher = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    bundle = tmp_path_factory.mktemp("mlp") / "bundle"
    convert_bundle(teacher, student, bundle)
    return ConvertedPair(teacher, student, bundle)


@pytest.fixture(scope="session")
def logits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert a 64-10 teacher without softmax, so it outputs logits."""
    keras = pytest.importorskip("keras")
    from converters.bundle import convert_teacher

    keras.utils.set_random_seed(5)
    teacher = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    path = tmp_path_factory.mktemp("logits-teacher") / "teacher.tflite"
    return convert_teacher(teacher, path)


@pytest.fixture(scope="session")
def two_head_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert the two-head student of ``tests/multihead_bundle.py`` once."""
    pytest.importorskip("keras")
    from tests.multihead_bundle import convert_two_head_bundle

    return convert_two_head_bundle(tmp_path_factory.mktemp("two-head") / "bundle")
