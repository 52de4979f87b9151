"""Differentiable ops whose forward and backward passes are LiteRT builtins.

TensorFlow's registered gradients for most layer ops lower to ops that LiteRT
runs only through Flex (``ReluGrad``, ``Conv2DBackpropFilter``,
``MaxPoolGrad``, ``BroadcastGradientArgs`` for a dynamic batch and others).
Each op here is a ``tf.custom_gradient`` whose backward pass uses builtin ops
only: convolutions, pads, strided slices, matmuls, masks and reductions.

Spatial ops take NHWC tensors with a dynamic batch and static height, width
and channels. The geometry of each window is computed in Python when the
graph is traced.
"""
