"""Model registry: config.model.name -> a linen Module class."""

from __future__ import annotations

import dataclasses

from absl import logging
import flax.linen as nn
import jax
from ml_collections import ConfigDict

from vitjax import errors
from vitjax.measure import machine
from vitjax.models.avit import AViT
from vitjax.models.bf16_dot import Bf16Dot
from vitjax.models.dynamic_vit import DynamicViT
from vitjax.models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {
    'vit': ViT,
    'dynamic_vit': DynamicViT,
    'avit': AViT,
}


def resolve_machine_choices(model_cfg: dict) -> dict:
  """model_cfg with dtype and kernels 'auto' made concrete for this machine
  (logged with the reason)."""
  model_cfg = dict(model_cfg)
  if model_cfg.get('dtype') == 'auto':
    native, why = machine.native_bfloat16()
    model_cfg['dtype'] = 'bfloat16' if native else 'float32'
    logging.log_first_n(
        logging.INFO, 'model.dtype=auto: %s, as %s.', 1, model_cfg['dtype'], why
    )
  kernels = model_cfg['kernels']
  if kernels == 'auto':
    # Measured faster on XLA:CPU (docs/performance.md#kernels); elsewhere the
    # libraries' kernels are what their compilers are tuned for.
    kernels = 'cpu' if jax.default_backend() == 'cpu' else 'xla'
    logging.log_first_n(
        logging.INFO,
        'model.kernels=auto: %s, on the %s backend.',
        1,
        kernels,
        jax.default_backend(),
    )
  if kernels not in ('cpu', 'xla'):
    raise errors.ConfigError(
        f"model.kernels={kernels!r}: expected 'auto', 'cpu' or 'xla'."
    )
  model_cfg['kernels'] = kernels
  return model_cfg


def with_machine_choices(config: ConfigDict) -> ConfigDict:
  """A copy of the run's config with model.dtype and model.kernels made
  concrete for this machine: config.json records what ran, and a resume on
  a machine that would choose otherwise is refused rather than changed."""
  resolved = resolve_machine_choices(config.model)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = resolved['dtype']
    config.model.kernels = resolved['kernels']
  return config


def fields(name: str) -> set[str]:
  """The fields of model `name`: what config.model may set, and what
  `create` overrides."""
  return {f.name for f in dataclasses.fields(MODELS[name])} - {'parent', 'name'}


def create(model_cfg, num_classes: int, **overrides) -> nn.Module:
  """Builds config.model (a flat dict of the class's fields) into a Module.

  `overrides` set fields that are not config (e.g. int8 dot_general_cls)
  or replace config values (A-ViT's calibrated gate_center). dtype 'auto'
  becomes bfloat16 where the machine computes it natively (GPUs, CPUs with
  AMX or AVX512_BF16) and float32 elsewhere.
  """
  kwargs = resolve_machine_choices(dict(model_cfg))
  name = kwargs.pop('name')
  if name not in MODELS:
    raise errors.ConfigError(
        f'model.name={name!r}: expected one of {sorted(MODELS)}.'
    )
  cls = MODELS[name]
  unknown = sorted(set(kwargs) - fields(name))
  if unknown:
    raise errors.ConfigError(
        f'config.model has fields {unknown} that {cls.__name__} '
        f'does not take (it takes {sorted(fields(name))}).'
    )
  if kwargs.get('dtype') == 'bfloat16' and kwargs['kernels'] == 'cpu':
    # Fast bf16 matmuls with float32 accumulation (see bf16_dot.py).
    overrides.setdefault('dot_general_cls', Bf16Dot)
  return cls(num_classes=num_classes, **(kwargs | overrides))
