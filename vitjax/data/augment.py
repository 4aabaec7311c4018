"""Per-image augmentation, written once for both input pipelines.

The code below uses only the NumPy API, and is run with `xp` set to
`tf.experimental.numpy` inside tf.data and to `jax.numpy` on the device, so
both pipelines apply literally the same transforms. Randomness is drawn by the
caller with its own stateless RNG, as the arrays described by `draw_shapes`,
and passed in: the transforms themselves are deterministic.

Pipeline: course crop (zero padding) -> horizontal flip -> RandAugment
(Cubuk et al. 2020): `layers` ops per image, each chosen uniformly from OPS,
at a fixed magnitude m in [0, 10] with a random sign. Geometric ops share
one nearest-neighbour affine warp (gray fill); Equalize is left out because
a per-image 256-bin histogram costs more than the rest together here.
Mixup and cutmix mix whole batches and labels, so they live in the train
step (`vitjax/data/mixing.py`), shared by both pipelines too.
"""

from __future__ import annotations

import math
from typing import Any

OPS = (
    'identity',
    'autocontrast',
    'posterize',
    'solarize',
    'color',
    'contrast',
    'brightness',
    'sharpness',
    'rotate',
    'shear_x',
    'shear_y',
    'translate_x',
    'translate_y',
)
_FIRST_GEOMETRIC = OPS.index('rotate')
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # of the image side: about 10 pixels at m=10 on CIFAR
MAX_ENHANCE = 0.9  # color/contrast/brightness/sharpness factor 1 +- 0.9 m
MAX_POSTERIZE_BITS = 4  # bits dropped at m=10
FILL = 128.0
_LUMA = (0.299, 0.587, 0.114)


def draw_shapes(aug_cfg, batch: int) -> dict[str, tuple[tuple[int, ...], int]]:
  """Random arrays `augment` expects: name -> (shape, exclusive int bound).

  The caller fills each with uniform integers in [0, bound). The batch is
  always the last axis, so a host can draw for the global batch and slice.
  """
  shapes = {}
  if aug_cfg.crop_padding > 0:
    shapes['crop'] = ((2, batch), 2 * aug_cfg.crop_padding + 1)
  if aug_cfg.flip:
    shapes['flip'] = ((batch,), 2)
  if aug_cfg.randaugment_layers > 0:
    shapes['ra_op'] = ((aug_cfg.randaugment_layers, batch), len(OPS))
    shapes['ra_sign'] = ((aug_cfg.randaugment_layers, batch), 2)
  return shapes


def augment(images, draws: dict[str, Any], aug_cfg, xp):
  """uint8 [b, h, w, c] images -> augmented uint8 images of the same shape."""
  x = xp.asarray(images, dtype=xp.float32)
  if 'crop' in draws:
    x = _crop(x, draws['crop'], aug_cfg.crop_padding, xp)
  if 'flip' in draws:
    flip = xp.reshape(draws['flip'] > 0, (-1, 1, 1, 1))
    x = xp.where(flip, x[:, :, ::-1, :], x)
  m = aug_cfg.randaugment_magnitude / 10.0
  for layer in range(aug_cfg.randaugment_layers):
    sign = xp.asarray(draws['ra_sign'][layer], dtype=xp.float32) * 2.0 - 1.0
    x = _randaugment_layer(x, draws['ra_op'][layer], sign, m, xp)
  return xp.asarray(xp.clip(xp.floor(x + 0.5), 0.0, 255.0), dtype=xp.uint8)


def _crop(x, offsets, pad: int, xp):
  b, h, w, _ = x.shape
  x = xp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='constant')
  offsets = xp.asarray(offsets, dtype=xp.int32)
  rows = offsets[0][:, None] + xp.arange(h, dtype=xp.int32)[None, :]
  cols = offsets[1][:, None] + xp.arange(w, dtype=xp.int32)[None, :]
  x = xp.take_along_axis(x, xp.reshape(rows, (b, h, 1, 1)), axis=1)
  return xp.take_along_axis(x, xp.reshape(cols, (b, 1, w, 1)), axis=2)


def _randaugment_layer(x, op, sign, m: float, xp):
  """Applies OPS[op[i]] to image i, at magnitude m and sign sign[i]."""
  per_image = lambda v: xp.reshape(v, (-1, 1, 1, 1))
  factor = per_image(1.0 + sign * (MAX_ENHANCE * m))
  gray = _luma(x, xp)
  colour_ops = {
      'autocontrast': lambda: _autocontrast(x, xp),
      'posterize': lambda: _posterize(x, round(MAX_POSTERIZE_BITS * m), xp),
      'solarize': lambda: xp.where(x >= 256.0 * (1.0 - m), 255.0 - x, x),
      'color': lambda: gray + factor * (x - gray),
      'contrast': lambda: (
          xp.mean(gray, axis=(1, 2, 3), keepdims=True)
          + factor * (x - xp.mean(gray, axis=(1, 2, 3), keepdims=True))
      ),
      'brightness': lambda: x * factor,
      'sharpness': lambda: _sharpness(x, factor, xp),
  }
  out = _warp(x, _affine(op, sign, m, x.shape[1], xp), xp)
  for name, fn in colour_ops.items():
    out = xp.where(per_image(op == OPS.index(name)), fn(), out)
  return xp.clip(out, 0.0, 255.0)


def _luma(x, xp):
  r, g, b = (x[..., i : i + 1] for i in range(3))
  return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def _autocontrast(x, xp):
  lo = xp.min(x, axis=(1, 2), keepdims=True)
  hi = xp.max(x, axis=(1, 2), keepdims=True)
  span = hi - lo
  scaled = (x - lo) * (255.0 / xp.where(span > 0, span, 1.0))
  return xp.where(span > 0, scaled, x)


def _posterize(x, bits_dropped: int, xp):
  step = float(2**bits_dropped)
  return xp.floor(x / step) * step


def _sharpness(x, factor, xp):
  """PIL's SHARPEN blend: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13, border kept."""
  _, h, w, _ = x.shape
  p = xp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='constant')
  box = sum(
      p[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)
  )
  blur = (box + 4.0 * x) / 13.0
  rows, cols = xp.arange(h, dtype=xp.int32), xp.arange(w, dtype=xp.int32)
  inner_r = xp.logical_and(rows > 0, rows < h - 1)
  inner_c = xp.logical_and(cols > 0, cols < w - 1)
  inner = xp.logical_and(
      xp.reshape(inner_r, (1, h, 1, 1)), xp.reshape(inner_c, (1, 1, w, 1))
  )
  blur = xp.where(inner, blur, x)
  return blur + factor * (x - blur)


def _affine(op, sign, m: float, size: int, xp):
  """Per-image inverse maps (a0, a1, a2, b0, b1, b2): output (x, y) reads
  input (a0 x + a1 y + a2, b0 x + b1 y + b2). Identity for non-geometric ops.
  """
  c = (size - 1) / 2.0
  is_op = lambda name: xp.asarray(op == OPS.index(name), dtype=xp.float32)
  theta = is_op('rotate') * sign * math.radians(MAX_ROTATE_DEGREES * m)
  cos, sin = xp.cos(theta), xp.sin(theta)
  sx = is_op('shear_x') * sign * (MAX_SHEAR * m)
  sy = is_op('shear_y') * sign * (MAX_SHEAR * m)
  tx = is_op('translate_x') * sign * (MAX_TRANSLATE * m * size)
  ty = is_op('translate_y') * sign * (MAX_TRANSLATE * m * size)
  # Rotation about the centre, then centred shears, then a shift; only one
  # of them is non-trivial for any image.
  a0, a1 = cos, sin + sx
  b0, b1 = sy - sin, cos
  a2 = c - a0 * c - a1 * c - tx
  b2 = c - b0 * c - b1 * c - ty
  return xp.stack([a0, a1, a2, b0, b1, b2], axis=1)


def _warp(x, params, xp):
  b, h, w, ch = x.shape
  ys = xp.reshape(xp.arange(h, dtype=xp.float32), (1, h, 1))
  xs = xp.reshape(xp.arange(w, dtype=xp.float32), (1, 1, w))
  p = lambda i: xp.reshape(params[:, i], (b, 1, 1))
  src_x = xp.floor(p(0) * xs + p(1) * ys + p(2) + 0.5)
  src_y = xp.floor(p(3) * xs + p(4) * ys + p(5) + 0.5)
  valid = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
  idx = xp.asarray(
      xp.clip(src_y, 0, h - 1) * w + xp.clip(src_x, 0, w - 1), dtype=xp.int32
  )
  flat = xp.reshape(x, (b, h * w, ch))
  out = xp.take_along_axis(flat, xp.reshape(idx, (b, h * w, 1)), axis=1)
  out = xp.reshape(out, (b, h, w, ch))
  return xp.where(xp.reshape(valid, (b, h, w, 1)), out, FILL)
