"""dslo-edge: device and hub runtime for distillation with dynamic soft labels.

Nothing in this package imports TensorFlow; model conversion lives in the
``converters`` package.
"""

__version__ = "0.1.0"
