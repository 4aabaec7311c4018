"""int8 inference for any checkpoint (ViT, DynamicViT, A-ViT) with aqtp.

What is quantized: every block's q/k/v, attention-output and MLP Dense
layers, W8A8 symmetric int8 (aqtp's numerics: scale = max|x| / 127.5,
round half to even) with one scale per output channel for the weights and,
for the activations (`eval.quant_activations`):
- 'static' (the default): one scale per layer, frozen. aqtp's static range
  calibration (MeanOfAbsMaxCalibration) averages the absolute maximum of
  the layer's input over batches of training images, and CONVERT freezes
  it. Serving then quantizes with a frozen scale, which XLA fuses into the
  op that produces the input (a LayerNorm, GELU): no pass of its own. The
  frozen scales are compiled into the serving program as constants
  (`Int8Server.prepare`), so that XLA folds what aqtp derives from them,
  and the query, key and value layers' common input (same input, same
  calibrated scale) is quantized once for the three.
- 'per_token': one scale per token, computed on the fly (max, scale,
  rounding: three small ops before every matmul).
With `eval.quant_fold_norms` (the default) the blocks' LayerNorm scales
and biases are first folded into the layers they feed
(norm_folding.py), and with static scales the input scale of those
layers then moves into the bare normalisation's gain
(server.py): their input quantization fuses into an op that
XLA:CPU keeps on one thread.
What stays float, and float32 whatever the model's own dtype: patch
embedding, LayerNorm, softmax, GELU, residual adds, position and class
embeddings, DynamicViT's predictors, and (unless `eval.quant_head` /
`eval.quant_attention`) the head and the two attention einsums.

Paths (`eval.quant_path`):
- 'serve' (the default): CONVERT freezes the int8 kernels and the scales
  into an 'aqt' collection; SERVE runs int8 x int8 -> int32 dots from it.
  The frozen model is saved as an orbax checkpoint that holds no float copy
  of the quantized kernels: aqtp still declares them (google/aqt#720), so
  zero kernels are rebuilt inside the jitted function, where they are dead
  code.
- 'fake': quantize, dequantize, float matmul (aqtp's DequantMode.THIS_INPUT;
  per-token scales only).
Backends (`eval.quant_backend`): 'aqt', or 'fallback', a hand-written
fake-quant with the same numerics, for a jax that breaks aqtp ('fake' only).

The modules: layers.py (the int8 layers injected into a model, by stage),
calibration.py (static activation scales), norm_folding.py (the blocks'
LayerNorm affines folded into the layers they feed) and server.py (the
frozen int8 model: conversion, serving, saving and loading).
"""

# The package's interface: what evaluation, serving and the scripts use.
# pylint: disable=g-importing-member
from vitjax.quant.calibration import calibrate, calibration_sample
from vitjax.quant.layers import FakeQuantDot, quantized_model
from vitjax.quant.norm_folding import float_model_to_quantize
from vitjax.quant.server import Int8Server, conversion_source, int8_predictor
from vitjax.quant.server import saved_fits, weight_bytes

__all__ = [
    'FakeQuantDot',
    'Int8Server',
    'calibrate',
    'calibration_sample',
    'conversion_source',
    'float_model_to_quantize',
    'int8_predictor',
    'quantized_model',
    'saved_fits',
    'weight_bytes',
]
