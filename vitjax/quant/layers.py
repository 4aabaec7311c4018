"""The int8 layers injected into a model: aqtp's AqtDotGeneral per Dense
layer (and optionally AqtEinsum for attention), by stage, or the
hand-written fake-quant fallback. See vitjax/quant/__init__.py."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import errors

_BLOCK_LAYERS = ('query', 'key', 'value', 'out', 'fc1', 'fc2')
PATHS = ('fake', 'serve')
BACKENDS = ('aqt', 'fallback')
ACTIVATION_SCALES = ('per_token', 'static')
# Where a static-scale calibration keeps its statistics.
CALIBRATION = 'aqt_calibration'


def check(quant_cfg) -> None:
  if quant_cfg.quant_path not in PATHS:
    raise errors.ConfigError(
        f'eval.quant_path={quant_cfg.quant_path!r}: expected one '
        f'of {PATHS}.'
    )
  if quant_cfg.quant_backend not in BACKENDS:
    raise errors.ConfigError(
        f'eval.quant_backend={quant_cfg.quant_backend!r}: '
        f'expected one of {BACKENDS}.'
    )
  if quant_cfg.quant_backend == 'fallback' and quant_cfg.quant_path == 'serve':
    raise errors.ConfigError(
        "eval.quant_path='serve' needs eval.quant_backend='aqt' (the "
        "fallback only fake-quantizes: with it, set eval.quant_path='fake' "
        "and eval.quant_activations='per_token')."
    )
  if not isinstance(quant_cfg.quant_fold_norms, bool):
    raise errors.ConfigError(
        f'eval.quant_fold_norms={quant_cfg.quant_fold_norms!r}: expected '
        'True or False.'
    )
  scales = quant_cfg.quant_activations
  if scales not in ACTIVATION_SCALES:
    raise errors.ConfigError(
        f'eval.quant_activations={scales!r}: expected one of '
        f'{ACTIVATION_SCALES}.'
    )
  if scales == 'static' and quant_cfg.quant_path != 'serve':
    raise errors.ConfigError(
        "eval.quant_activations='static' calibrates the scales of the "
        "frozen serving model: use it with eval.quant_path='serve', or "
        "simulate per-token scales with eval.quant_activations='per_token'."
    )


def _aqt_config(fake: bool, static_stage: str | None = None):
  """aqtp's int8 config. static_stage: for static activation scales, the
  stage ('calibrate', 'convert' or 'serve') whose calibration it sets."""
  from aqt.jax.v2 import aqt_dot_general, config  # pylint: disable=g-import-not-at-top
  from aqt.jax.v2.flax import aqt_flax_calibration  # pylint: disable=g-import-not-at-top

  cfg = config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
  if fake:
    mode = aqt_dot_general.DequantMode.THIS_INPUT
    config.set_fwd_dequant_mode(
        cfg, lhs_dequant_mode=mode, rhs_dequant_mode=mode
    )
    config.set_accumulator_dtype(
        cfg, fwd_dtype=None, dlhs_dtype=config.SKIP, drhs_dtype=config.SKIP
    )
  if static_stage is not None:
    # aqtp's static range calibration: one scale per layer for its input
    # ('per_tensor'), the mean over calibration batches of the batch's
    # absolute maximum. Serving reads the frozen scale, so there the
    # calibrator is aqtp's stateless default, whose output is unused (and
    # compiled away: aqt_dot_general.quant replaces it by the frozen one).
    # Only the activations (lhs): the weights keep the per-channel absmax
    # of the per-token path, bit for bit.
    lhs = cfg.fwd.dg_quantizer.lhs
    if static_stage != 'serve':
      lhs.calibration = functools.partial(
          aqt_flax_calibration.MeanOfAbsMaxCalibration,
          quant_collection=CALIBRATION,
      )
    lhs.calib_shared_axes = 'per_tensor'
  return cfg


def _dot_general_cls(quant_cfg, stage: str) -> Callable[[], Any]:
  """stage: 'fake', 'calibrate' (static scales only), 'convert' or 'serve'.
  One instance per layer (aqtp's CONVERT would otherwise write every layer
  into one shared variable)."""
  if quant_cfg.quant_backend == 'fallback':
    return FakeQuantDot
  from aqt.jax.v2.flax import aqt_flax  # pylint: disable=g-import-not-at-top

  mode = {
      'fake': aqt_flax.QuantMode.TRAIN,
      'calibrate': aqt_flax.QuantMode.CALIBRATE,
      'convert': aqt_flax.QuantMode.CONVERT,
      'serve': aqt_flax.QuantMode.SERVE,
  }[stage]
  if quant_cfg.quant_activations == 'static':
    # The activations go through the same stages as the weights; only
    # their scale is frozen.
    return functools.partial(
        aqt_flax.AqtDotGeneral,
        _aqt_config(False, stage),
        prng_name=None,
        lhs_quant_mode=mode,
        rhs_quant_mode=mode,
        lhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION,
        rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
    )
  return functools.partial(
      aqt_flax.AqtDotGeneral,
      _aqt_config(stage == 'fake'),
      prng_name=None,
      lhs_quant_mode=aqt_flax.QuantMode.TRAIN,
      rhs_quant_mode=mode,
      rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
  )


def _einsum_cls(quant_cfg) -> Callable[[], Any] | None:
  if not quant_cfg.quant_attention:
    return None
  if quant_cfg.quant_backend == 'fallback':
    raise errors.ConfigError(
        "eval.quant_attention needs eval.quant_backend='aqt'."
    )
  from aqt.jax.v2.flax import aqt_flax  # pylint: disable=g-import-not-at-top
  # Both operands are activations, quantized per call.
  return functools.partial(
      aqt_flax.AqtEinsum,
      _aqt_config(quant_cfg.quant_path == 'fake'),
      prng_name=None,
  )


def quantized_model(model: nn.Module, quant_cfg, stage: str) -> nn.Module:
  """The same model with int8 injected into its Dense layers (see top)."""
  check(quant_cfg)
  if stage == 'fake' and quant_cfg.quant_activations == 'static':
    raise errors.ConfigError(
        'Fake quantization simulates per-token scales: set '
        "eval.quant_activations='per_token'."
    )
  dot = _dot_general_cls(quant_cfg, stage)
  # Whatever the model trained in, the int8 model's float parts compute in
  # float32: from bfloat16, every activation quantization and dequantization
  # adds a conversion pass: the CPU preset's model served at 0.99x float32's
  # images/s at batch 256 with bfloat16 float parts, 1.32x with float32 ones
  # (scripts/compare.py; CHANGELOG.md, 0.1.0).
  return model.clone(
      dtype='float32',
      dot_general_cls=dot,
      head_dot_general_cls=dot if quant_cfg.quant_head else None,
      attention_einsum_cls=_einsum_cls(quant_cfg),
  )


class FakeQuantDot:
  """Hand-written symmetric int8 fake-quant with aqtp's numerics.

  Each operand is scaled by its abs-max over its own contracting axes (per
  token for activations, per output channel for kernels), / 127.5, rounded
  half to even, clipped to +-127, dequantized, then multiplied in float.
  """

  def __call__(
      self,
      lhs,
      rhs,
      dimension_numbers,
      precision=None,
      preferred_element_type=None,
      **kwargs,
  ):
    (lc, rc), _ = dimension_numbers
    return jax.lax.dot_general(
        fake_quant(lhs, tuple(lc)),
        fake_quant(rhs, tuple(rc)),
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )


def fake_quant(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=axes, keepdims=True) / 127.5
  scale = jnp.where(scale == 0, 1.0, scale)
  q = jnp.clip(jnp.round(x32 / scale), -127, 127)
  return (q * scale).astype(x.dtype)


def is_quantized_kernel(path: tuple[str, ...], quant_cfg) -> bool:
  names = set(path)
  if path[-1] != 'kernel':
    return False
  if any(p.startswith('predictors_') for p in path):
    return False
  return bool(names & set(_BLOCK_LAYERS)) or (
      quant_cfg.quant_head and path[0] == 'head'
  )
