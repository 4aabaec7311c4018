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
(models/norm_folding.py), and with static scales the input scale of those
layers then moves into the bare normalisation's gain
(`_absorb_input_scales`): their input quantization fuses into an op that
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
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vitjax import errors
from vitjax.data.sources import IMAGE_SHAPE
from vitjax.models import norm_folding

# Kernels of these Dense layers are the quantized ones.
_BLOCK_LAYERS = ('query', 'key', 'value', 'out', 'fc1', 'fc2')
PATHS = ('fake', 'serve')
BACKENDS = ('aqt', 'fallback')
ACTIVATION_SCALES = ('per_token', 'static')
# Where a static-scale calibration keeps its statistics.
_CALIBRATION = 'aqt_calibration'


def _check(quant_cfg) -> None:
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
          quant_collection=_CALIBRATION,
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


def float_model_to_quantize(
    model: nn.Module, params: Any, quant_cfg
) -> tuple[nn.Module, Any]:
  """The float model and weights that int8 quantizes: with
  eval.quant_fold_norms, the blocks' LayerNorm affines folded into the
  layers they feed (the same function; models/norm_folding.py). params may
  be jax.ShapeDtypeStructs (the folded ones' shapes come back)."""
  if not quant_cfg.quant_fold_norms:
    return model, params
  fold = norm_folding.fold_block_norms
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    folded = jax.eval_shape(fold, params)
  else:
    # Jitted, the folded leaves keep the params' placement on the mesh.
    folded = jax.jit(fold)(params)
  return model.clone(block_norm_affine=False), folded


def quantized_model(model: nn.Module, quant_cfg, stage: str) -> nn.Module:
  """The same model with int8 injected into its Dense layers (see top)."""
  _check(quant_cfg)
  if stage == 'fake' and quant_cfg.quant_activations == 'static':
    raise errors.ConfigError(
        'Fake quantization simulates per-token scales: set '
        "eval.quant_activations='per_token'."
    )
  dot = _dot_general_cls(quant_cfg, stage)
  # Whatever the model trained in, the int8 model's float parts compute in
  # float32: from bfloat16, every activation quantization and dequantization
  # adds a conversion pass. Measured (README, "int8"; scripts/compare.py):
  # the CPU preset's model served at 0.99x float32's images/s at batch 256
  # with bfloat16 float parts, 1.32x with float32 ones.
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


def _split(params: Any, quant_cfg) -> tuple[Any, dict[str, Any]]:
  """(params without the quantized kernels, {path: kernel shape/dtype})."""
  removed = {}

  def walk(tree, prefix):
    out = {}
    for k, v in tree.items():
      path = prefix + (k,)
      if isinstance(v, dict):
        out[k] = walk(v, path)
      elif is_quantized_kernel(path, quant_cfg):
        removed['/'.join(path)] = jax.ShapeDtypeStruct(v.shape, v.dtype)
      else:
        out[k] = v
    return out

  return walk(params, ()), removed


def _with_zero_kernels(params: Any, removed: dict[str, Any]) -> Any:
  params = jax.tree.map(lambda x: x, params)  # a copy we may extend
  for path, spec in removed.items():
    node = params
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.zeros(spec.shape, spec.dtype)
  return params


# Where a layer's frozen input (lhs) and weight (rhs) scales sit under it.
_INPUT_SCALE = ('AqtDotGeneral_0', 'qlhs', 'scale')
_WEIGHT_SCALE = ('AqtDotGeneral_0', 'qrhs', 'scale')


def _absorb_input_scales(params: Any, frozen: Any) -> tuple[Any, Any]:
  """(float-free params, frozen) of folded block norms with static scales,
  with each norm's input scale s moved out of its readers' quantization:
  they calibrate on the same input, so their frozen s is one value. The
  norm's gain takes 1/s, the readers' weight scales take s, and their input
  scale becomes 1, which serving multiplies by as a compiled-in constant
  (`Int8Server.prepare`) and XLA drops. The same quantized values up to
  float rounding, and one multiply less per element in the op that fuses
  the norm and the quantization (models/norm_folding.py says why that
  matters)."""
  params = traverse_util.flatten_dict(params)
  frozen = traverse_util.flatten_dict(frozen, keep_empty_nodes=True)
  blocks = {path[0] for path in params}
  for block in norm_folding.block_names(blocks):
    for norm, readers in norm_folding.READERS.items():
      layers = [(block, *reader) for reader in readers]
      scales = [np.asarray(frozen[layer + _INPUT_SCALE]) for layer in layers]
      if not all(np.array_equal(scales[0], x) for x in scales):
        continue  # not one input scale: leave them to the quantization
      s = np.float32(scales[0].reshape(()))
      if not (np.isfinite(s) and s > 0):
        continue  # aqtp serves such a scale as 1: leave it to aqtp
      gain = (block, norm, 'gain')
      params[gain] = np.float32(np.asarray(params[gain]) / s)
      for layer in layers:
        frozen[layer + _INPUT_SCALE] = np.ones_like(scales[0])
        weight = np.asarray(frozen[layer + _WEIGHT_SCALE])
        frozen[layer + _WEIGHT_SCALE] = (weight * s).astype(weight.dtype)
  return (
      traverse_util.unflatten_dict(params),
      traverse_util.unflatten_dict(frozen),
  )


class Int8Server:
  """A frozen int8 model: what CONVERT produced, run with SERVE.

  Built by `convert` or `load` from the float model that was quantized
  (with folded norms, `float_model_to_quantize`'s). Its frozen scales are
  read once, when it is built, and compiled into the programs that call
  `prepare`: to serve other scales, build another server.
  """

  def __init__(
      self,
      model: nn.Module,
      quant_cfg,
      params: Any,
      frozen: Any,
      removed: dict[str, Any],
  ):
    self.model = quantized_model(model, quant_cfg, 'serve')
    self.params, self.frozen, self.removed = params, frozen, removed
    # The frozen scales as host arrays, compiled into the serving program
    # as constants (see `prepare`).
    self.scales = {
        path: np.asarray(x)
        for path, x in traverse_util.flatten_dict(frozen).items()
        if path[-1] == 'scale'
    }

  @classmethod
  def convert(
      cls,
      model: nn.Module,
      quant_cfg,
      params: Any,
      image_shape: tuple[int, ...] = IMAGE_SHAPE,
      calibration_images: np.ndarray | None = None,
  ) -> 'Int8Server':
    """calibration_images: uint8 [n, *image_shape], what static activation
    scales are calibrated on (see `calibrate`)."""
    model, params = float_model_to_quantize(model, params, quant_cfg)
    stats = {}
    if quant_cfg.quant_activations == 'static':
      if calibration_images is None:
        raise errors.ConfigError(
            "eval.quant_activations='static' calibrates on training images, "
            'and none were given: convert where the data is (an int8 '
            'evaluation, `--mode=eval --config.eval.quant=int8`, saves the '
            "calibrated model), or use eval.quant_activations='per_token'."
        )
      stats = calibrate(model, quant_cfg, params, calibration_images)
    converter = quantized_model(model, quant_cfg, 'convert')
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.uint8)
    _, variables = jax.jit(
        lambda p, s: converter.apply(
            {'params': p} | s,
            dummy,
            train=False,
            # aqtp's lifted dot reads the statistics only from a mutable
            # collection (CONVERT does not change them).
            mutable=['aqt', _CALIBRATION],
        )
    )(params, stats)
    float_free, removed = _split(params, quant_cfg)
    frozen = variables['aqt']
    if quant_cfg.quant_fold_norms and quant_cfg.quant_activations == 'static':
      float_free, frozen = _absorb_input_scales(float_free, frozen)
    return cls(model, quant_cfg, float_free, frozen, removed)

  def prepare(self, variables: Any) -> Any:
    """{'params': float-free, 'aqt': frozen} -> what SERVE's apply takes.

    Call it inside the jitted function: the zero kernels are dead code there
    and never materialise, and the frozen scales are this server's own, as
    constants of the compiled program rather than arguments (variables'
    scales are not read): XLA then folds what aqtp computes from them per
    call (their reciprocals, the input and weight scales' products, the
    absorbed input scales of 1), and the query, key and value layers'
    quantizations of their common input become one. It expects variables
    of this server's model (the int8 kernels are read from them). Called
    outside a jitted function (A-ViT's token removal prepares once and
    jits each block apart), the scales reach those blocks as arguments:
    the same values, without those folds.
    """
    frozen = traverse_util.flatten_dict(variables['aqt'], keep_empty_nodes=True)
    frozen.update(self.scales)
    return {
        'params': _with_zero_kernels(variables['params'], self.removed),
        'aqt': traverse_util.unflatten_dict(frozen),
    }

  def predict(self, images: jax.Array) -> jax.Array:
    apply = lambda v, x: self.model.apply(self.prepare(v), x, train=False)[0]
    return jax.jit(apply)({'params': self.params, 'aqt': self.frozen}, images)

  def save(self, directory: Path, source: dict[str, Any]) -> int:
    """Writes an orbax checkpoint, and beside it (`source_file`) `source`:
    what it was converted from (step, int8 settings), which a reader checks
    before serving it. Returns the checkpoint's bytes on disk."""
    directory = Path(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(
        directory.absolute(),
        {'params': self.params, 'aqt': self.frozen},
        force=True,
    )
    checkpointer.wait_until_finished()
    source_file(directory).write_text(json.dumps(source, sort_keys=True))
    return sum(f.stat().st_size for f in directory.rglob('*') if f.is_file())

  @classmethod
  def load(
      cls,
      directory: Path,
      model: nn.Module,
      quant_cfg,
      params: Any,
      image_shape: tuple[int, ...] = IMAGE_SHAPE,
  ) -> 'Int8Server':
    """Restores a saved server. params: the float weights or only their
    shapes and dtypes (jax.ShapeDtypeStruct): the saved tree's structure is
    traced from them with jax.eval_shape, so the float checkpoint need not
    be read."""
    spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    model, params = float_model_to_quantize(
        model, jax.tree.map(spec, params), quant_cfg
    )
    image = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8)
    stats = {}
    if quant_cfg.quant_activations == 'static':
      stats = _calibration_spec(model, quant_cfg, params, image_shape)
    converter = quantized_model(model, quant_cfg, 'convert')
    _, variables = jax.eval_shape(
        lambda p, s, x: converter.apply(
            {'params': p} | s, x, train=False, mutable=['aqt', _CALIBRATION]
        ),
        params,
        stats,
        image,
    )
    float_free, removed = _split(params, quant_cfg)
    abstract = {'params': float_free, 'aqt': variables['aqt']}
    restored = ocp.StandardCheckpointer().restore(
        Path(directory).absolute(), abstract
    )
    return cls(model, quant_cfg, restored['params'], restored['aqt'], removed)


def _calibration_model(model: nn.Module) -> nn.Module:
  """The model static scales are calibrated through. A-ViT: its faithful
  forward, whose masked LayerNorms feed halted tokens' rows as zeros to the
  layers they feed (query, key, value, fc1), as token removal (its serving
  path) leaves them out; otherwise they would count in those layers'
  maxima (halted rows still count in the attention output's and fc2's).
  Its predictions are the same."""
  if 'faithful' in {f.name for f in dataclasses.fields(model)}:
    return model.clone(faithful=True)
  return model


def _calibration_step(
    model: nn.Module, quant_cfg, params: Any, stats: Any, images: jax.Array
) -> Any:
  """The static-scale statistics after one more batch (from `stats`, or
  created by it if {})."""
  calibrator = quantized_model(
      _calibration_model(model), quant_cfg, 'calibrate'
  )
  _, variables = calibrator.apply(
      {'params': params} | stats, images, train=False, mutable=[_CALIBRATION]
  )
  return {_CALIBRATION: variables[_CALIBRATION]}


def _calibration_spec(
    model: nn.Module, quant_cfg, params: Any, image_shape: tuple[int, ...]
) -> Any:
  """The shapes and dtypes of the static-scale statistics."""
  return jax.eval_shape(
      functools.partial(_calibration_step, model, quant_cfg),
      params,
      {},
      jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8),
  )


CALIBRATION_BATCH = 128


def calibrate(
    model: nn.Module, quant_cfg, params: Any, images: np.ndarray
) -> Any:
  """Static activation scales' statistics (aqtp's MeanOfAbsMaxCalibration):
  for each quantized layer, the absolute maximum of its input over each
  batch of CALIBRATION_BATCH images, averaged over the batches of `images`
  (a whole number of them: see calibration_sample)."""
  batches = len(images) // CALIBRATION_BATCH
  if batches < 1:
    raise errors.ConfigError(
        f'Calibrating static int8 scales takes at least {CALIBRATION_BATCH} '
        f'training images, and there are {len(images)}: use '
        "eval.quant_activations='per_token'."
    )
  # The statistics start at zero (aqtp counts no batch when it creates them).
  stats = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      _calibration_spec(model, quant_cfg, params, images.shape[1:]),
  )
  step = jax.jit(functools.partial(_calibration_step, model, quant_cfg))
  for b in range(batches):
    batch = images[b * CALIBRATION_BATCH : (b + 1) * CALIBRATION_BATCH]
    stats = step(params, stats, batch)
  return stats


def calibration_sample(images: np.ndarray, quant_cfg, seed: int) -> np.ndarray:
  """The training images static scales are calibrated on: a seeded sample
  of eval.quant_calibration_images of them (fewer if the split is smaller),
  a whole number of calibration batches."""
  n = min(int(quant_cfg.quant_calibration_images), len(images))
  n = max(n // CALIBRATION_BATCH, 1) * CALIBRATION_BATCH
  pick = np.random.default_rng(seed).permutation(len(images))[:n]
  return images[np.sort(pick)]


def source_file(directory: Path) -> Path:
  """Where a saved server records what it was converted from."""
  directory = Path(directory)
  return directory.with_name(directory.name + '.json')


def conversion_source(step: int, quant_cfg, ema: bool) -> dict[str, Any]:
  """What a frozen int8 model depends on: the step and weights it was
  converted from, and the int8 settings."""
  return {
      'step': int(step),
      'ema': bool(ema),
      'head': bool(quant_cfg.quant_head),
      'attention_einsums': bool(quant_cfg.quant_attention),
      # The kernels are quantized from float32 (older conversions quantized
      # a bfloat16 model's kernels from their bfloat16 roundings).
      'float_dtype': 'float32',
      'activations': quant_cfg.quant_activations,
      'calibration_images': (
          int(quant_cfg.quant_calibration_images)
          if quant_cfg.quant_activations == 'static'
          else 0
      ),
      'fold_block_norms': bool(quant_cfg.quant_fold_norms),
  }


def weight_bytes(params: Any, server: 'Int8Server') -> dict[str, int]:
  """Bytes of the quantized kernels as float32 and as frozen int8 values
  plus their float32 scales (read off the CONVERT output), and of the
  whole model in each form."""
  as_float = sum(4 * int(np.prod(s.shape)) for s in server.removed.values())
  as_int8 = sum(
      int(np.asarray(x).nbytes) for x in jax.tree.leaves(server.frozen)
  )
  total = sum(4 * int(np.size(x)) for x in jax.tree.leaves(params))
  # What the server keeps in float (folded LayerNorms hold no weights).
  float_rest = sum(
      int(np.asarray(x).nbytes) for x in jax.tree.leaves(server.params)
  )
  return {
      'float32_kernel_bytes': as_float,
      'int8_kernel_bytes': as_int8,
      'float32_model_bytes': total,
      # Folded norms hold a scalar gain where the float model holds a
      # scale and a bias: a few hundred bytes fewer.
      'int8_model_bytes': float_rest + as_int8,
  }
