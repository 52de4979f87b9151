"""Save a ``tf.Module`` and convert it to a LiteRT flatbuffer of builtin ops.

Precision modes:

- ``float32``: weights and arithmetic in float32.
- ``float16``: weights stored as float16 in the file and dequantized to
  float32 when the interpreter loads them, so variables start from the
  dequantized values. Arithmetic stays float32: this halves weight storage
  only.
- ``int8``: full-integer post-training quantization calibrated on a
  representative dataset, with float32 inputs and outputs. Only for
  inference-only models (the teacher, or an inference copy of the student).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from converters.heads import head_name, output_layer_names
from converters.output_dir import SAVED_MODEL_PREFIX
from dslo_edge.errors import ConversionError

PRECISIONS = ("float32", "float16", "int8")

_FLEX_OP_PATTERN = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")

INT8_TRAINABLE_REFUSAL = (
    "an int8 trainable student is not supported: gradients and optimizer "
    "updates are far smaller than one int8 step of the weights, so training "
    "would round every update to zero; train in float32 (optionally stored as "
    "float16) and export an int8 inference copy with --int8-student-copy"
)


# TensorFlow 2.21 opens a name scope per Keras layer when it traces a model,
# and its error message gives this pattern for scope names.
_SCOPE_NAME = re.compile(r"[A-Za-z0-9_.\\/>-]*")


def _check_scope_names(model: Any, role: str) -> None:
    """Reject a model with a layer name that TensorFlow cannot trace."""
    layers = list(model.layers)
    while layers:
        layer = layers.pop()
        layers.extend(getattr(layer, "layers", []))
        if not _SCOPE_NAME.fullmatch(layer.name):
            raise ConversionError(
                f"the {role}'s layer {layer.name!r} has a name that TensorFlow "
                "cannot trace: it accepts only ASCII letters, digits and "
                "_ . / > - in layer names; rename the layer, and an output layer "
                "in both the student and the teacher"
            )


class InferenceModule(tf.Module):
    """A Keras model exported with one ``infer`` signature.

    A model with one output returns it as ``output``. A model with several
    outputs returns ``output_<head>`` for each, with the head names of
    ``converters.heads``.
    """

    def __init__(self, model: Any, name: str):
        super().__init__(name=name)
        _check_scope_names(model, "student" if name.startswith("student") else name)
        self.model = model
        # Keras 3 variables are invisible to tf.Module tracking; holding the
        # backing tf.Variables makes the saved model (and LiteRT) keep them.
        self.tracked_variables = [variable.value for variable in model.weights]

    def signatures(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """Build the ``infer`` concrete function for inputs of this shape."""

        def infer(x: tf.Tensor) -> dict[str, tf.Tensor]:
            result = self.model(x, training=False)
            if len(self.model.outputs) == 1:
                return {"output": result}
            names = output_layer_names(self.model)
            values = tf.nest.flatten(result)
            return {
                f"output_{head_name(name)}": value
                for name, value in zip(names, values, strict=True)
            }

        spec = tf.TensorSpec([None, *input_shape], tf.float32, name="x")
        return {"infer": tf.function(infer).get_concrete_function(spec)}


def check_precision(precision: str, role: str, trainable: bool) -> None:
    """Raise ConversionError for an unknown or unsupported precision."""
    if precision not in PRECISIONS:
        raise ConversionError(
            f"unknown precision '{precision}' for the {role}; expected one of "
            f"{', '.join(PRECISIONS)}"
        )
    if trainable and precision == "int8":
        raise ConversionError(INT8_TRAINABLE_REFUSAL)


def to_tflite(
    module: tf.Module,
    signatures: dict[str, Any],
    role: str,
    precision: str = "float32",
    representative_data: np.ndarray | None = None,
    work_dir: Path | None = None,
) -> bytes:
    """Convert a module's signatures with LiteRT builtin ops only.

    Args:
        module: the module to save; it must own every variable it uses.
        signatures: concrete functions by signature name.
        role: "student", "teacher" or similar, used in error messages.
        precision: one of ``PRECISIONS``.
        representative_data: input samples for int8 calibration.
        work_dir: the directory for the SavedModel that the converter
            reads, the system temp directory by default. ``convert_bundle``
            passes its staging directory, so a conversion killed by SIGKILL
            leaves the SavedModel there, and the next conversion into the
            same parent directory deletes it.

    Raises:
        ConversionError: Flex ops are needed, int8 lacks representative
            data, or the converter fails.
    """
    with tempfile.TemporaryDirectory(prefix=SAVED_MODEL_PREFIX, dir=work_dir) as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=list(signatures)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        _set_precision(converter, precision, role, representative_data)
        try:
            return bytes(converter.convert())
        except Exception as error:
            raise _conversion_error(error, role) from error


def _set_precision(
    converter: Any,
    precision: str,
    role: str,
    representative_data: np.ndarray | None,
) -> None:
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if representative_data is None or len(representative_data) == 0:
            raise ConversionError(
                f"int8 export of the {role} needs a representative dataset to "
                "calibrate activation ranges; pass representative_data "
                "(--representative FILE.npz with an x array)"
            )
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # NOTE: TensorFlow 2.21's quantizer prints "fully_quantize: 0,
        # inference_type: 6, ..." with LLVM's dbgs(), which is plain stderr in
        # release builds, so TF_CPP_MIN_LOG_LEVEL and absl's levels cannot hide
        # it. Redirecting file descriptor 2 would, but it would also swallow
        # the converter's own message if the converter aborts the process.
        converter.representative_dataset = _samples(representative_data)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


def _samples(data: np.ndarray) -> Any:
    def generate() -> Iterator[list[np.ndarray]]:
        for sample in np.asarray(data, np.float32):
            yield [sample[None]]

    return generate


def _conversion_error(error: Exception, role: str) -> ConversionError:
    ops = sorted(set(_FLEX_OP_PATTERN.findall(str(error))))
    if ops:
        return ConversionError(
            f"the {role} needs TensorFlow ops that LiteRT runs only with "
            f"Flex: {', '.join(ops)}; remove or replace the layers that "
            "use them, since device interpreters have no Flex support"
        )
    if "TensorList" in str(error):
        return _tensor_list_error(str(error), role)
    return ConversionError(f"LiteRT conversion of the {role} failed: {error}")


# TensorFlow's converter names the op that failed with its name scope, such
# as "sequential_1/gru_1/TensorArrayV2_1" for the Keras layer "gru".
_TENSOR_LIST_SCOPE_PATTERN = re.compile(r'"TensorList\w+:", "([^"@]+)/[^/"@]+@')


def _tensor_list_error(text: str, role: str) -> ConversionError:
    # Keras runs a recurrent layer's time steps in a while loop over
    # TensorList ops, which TensorFlow 2.21 lowers to builtin ops only for a
    # static element shape, and the batch size is dynamic. An unrolled layer
    # has no loop.
    scopes = sorted(set(_TENSOR_LIST_SCOPE_PATTERN.findall(text)))
    where = f", at TensorFlow name scope {', '.join(scopes)}," if scopes else ","
    return ConversionError(
        f"the {role} has a recurrent layer, such as GRU or LSTM{where} "
        "whose time-step loop LiteRT's builtin ops cannot run; set "
        "unroll=True on the layer, which its fixed sequence length allows, "
        "then save the model again"
    )
