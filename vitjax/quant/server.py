"""The frozen int8 model: what aqtp's CONVERT produced, served with SERVE,
saved as an orbax checkpoint without float copies of the quantized
kernels. See vitjax/quant/__init__.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vitjax import errors, parallel
from vitjax.data.sources import IMAGE_SHAPE
from vitjax.evaluators.classification import Predictor
from vitjax.quant import calibration, layers, norm_folding


def _split(params: Any, quant_cfg) -> tuple[Any, dict[str, Any]]:
  """(params without the quantized kernels, {path: kernel shape/dtype})."""
  removed = {}

  def walk(tree, prefix):
    out = {}
    for k, v in tree.items():
      path = prefix + (k,)
      if isinstance(v, dict):
        out[k] = walk(v, path)
      elif layers.is_quantized_kernel(path, quant_cfg):
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
  the norm and the quantization (norm_folding.py says why that
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
    self.model = layers.quantized_model(model, quant_cfg, 'serve')
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
    model, params = norm_folding.float_model_to_quantize(
        model, params, quant_cfg
    )
    stats = {}
    if quant_cfg.quant_activations == 'static':
      if calibration_images is None:
        raise errors.ConfigError(
            "eval.quant_activations='static' calibrates on training images, "
            'and none were given: convert where the data is (an int8 '
            'evaluation, `--mode=eval --config.eval.quant=int8`, saves the '
            "calibrated model), or use eval.quant_activations='per_token'."
        )
      stats = calibration.calibrate(
          model, quant_cfg, params, calibration_images
      )
    converter = layers.quantized_model(model, quant_cfg, 'convert')
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.uint8)
    _, variables = jax.jit(
        lambda p, s: converter.apply(
            {'params': p} | s,
            dummy,
            train=False,
            # aqtp's lifted dot reads the statistics only from a mutable
            # collection (CONVERT does not change them).
            mutable=['aqt', layers.CALIBRATION],
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

  def predictor(self) -> Predictor:
    """The server as evaluation and serving run it."""
    return Predictor(
        self.model,
        {'params': self.params, 'aqt': self.frozen},
        prepare=self.prepare,
    )

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
    model, params = norm_folding.float_model_to_quantize(
        model, jax.tree.map(spec, params), quant_cfg
    )
    image = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8)
    stats = {}
    if quant_cfg.quant_activations == 'static':
      stats = calibration.calibration_spec(
          model, quant_cfg, params, image_shape
      )
    converter = layers.quantized_model(model, quant_cfg, 'convert')
    _, variables = jax.eval_shape(
        lambda p, s, x: converter.apply(
            {'params': p} | s,
            x,
            train=False,
            mutable=['aqt', layers.CALIBRATION],
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


def source_file(directory: Path) -> Path:
  """Where a saved server records what it was converted from."""
  directory = Path(directory)
  return directory.with_name(directory.name + '.json')


def conversion_source(step: int, quant_cfg, ema: bool) -> dict[str, Any]:
  """What a frozen int8 model depends on: the step and weights it was
  converted from, and the int8 settings."""
  static = quant_cfg.quant_activations == 'static'
  return {
      'step': int(step),
      'ema': bool(ema),
      'head': bool(quant_cfg.quant_head),
      'attention_einsums': bool(quant_cfg.quant_attention),
      'activations': quant_cfg.quant_activations,
      'calibration_images': (
          int(quant_cfg.quant_calibration_images) if static else 0
      ),
      # Earlier saves calibrated on batches of one or two classes.
      'calibration_batches': 'class-mixed' if static else '',
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


def saved_fits(saved: Path, source: dict[str, Any]) -> bool:
  """Whether the int8 model saved at `saved` was converted from `source`
  (conversion_source: an evaluation of another step, or with other
  eval.quant_* settings, may have written it)."""
  record = source_file(saved)
  if not saved.is_dir() or not record.exists():
    return False
  if json.loads(record.read_text()) == source:
    return True
  logging.info(
      'The int8 model in %s was converted from %s, not %s.',
      saved,
      record.read_text(),
      source,
  )
  return False


def int8_predictor(
    model: nn.Module,
    params: Any,
    quant_cfg,
    calibration_images: np.ndarray | None,
    save_dir: Path,
    source: dict[str, Any],
) -> tuple[Predictor, dict[str, Any]]:
  """The int8 predictor of eval.quant_path for a float model's float32
  weights, and what to report about it. The serving path converts them,
  saves the frozen model in save_dir (with `source`, conversion_source)
  and serves what it reads back: the round trip is part of the check."""
  info = {
      'path': quant_cfg.quant_path,
      'backend': quant_cfg.quant_backend,
      'head': quant_cfg.quant_head,
      'attention_einsums': quant_cfg.quant_attention,
      'activations': quant_cfg.quant_activations,
      'calibration_images': (
          0 if calibration_images is None else len(calibration_images)
      ),
      'fold_block_norms': quant_cfg.quant_fold_norms,
  }
  if quant_cfg.quant_path == 'fake':
    folded_model, folded = norm_folding.float_model_to_quantize(
        model, params, quant_cfg
    )
    fake = layers.quantized_model(folded_model, quant_cfg, 'fake')
    return Predictor(fake, {'params': folded}), info
  server = Int8Server.convert(
      model, quant_cfg, params, calibration_images=calibration_images
  )
  info.update(weight_bytes(params, server))
  # Every process takes part in orbax's save, and reads it back only once
  # it is complete.
  info['checkpoint_bytes_on_disk'] = server.save(save_dir, source)
  info['checkpoint'] = str(save_dir)
  parallel.barrier('int8 server saved')
  server = Int8Server.load(save_dir, model, quant_cfg, params)
  return server.predictor(), info
