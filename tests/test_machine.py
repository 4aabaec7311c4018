"""Every figure names its machine: what machine.py reads and prints."""

import re

import pytest

from configs import vit as vit_config
from vitjax.measure import machine
from vitjax import models

ZEN4 = {
    'model name': 'AMD EPYC',
    'cpu family': '25',
    'model': '17',
    'flags': 'fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 vaes',
}


def test_the_cpu_is_named_with_its_family_and_features(monkeypatch):
  monkeypatch.setattr(machine, '_cpuinfo', lambda: ZEN4)
  m = machine.describe()
  assert m['cpu'] == 'AMD EPYC' and m['cpu_family_model'] == '25/17'
  assert m['cpu_features'] == ['avx2', 'avx512f', 'avx512_bf16']
  assert m['accelerator'] == 'none'  # the tests run on CPU devices
  assert m['cpu_cores'] >= 1 and m['jax'] and m['jaxlib']
  cores = f'{m["cpu_cores"]} core' + ('' if m['cpu_cores'] == 1 else 's')
  assert machine.summary(m) == (
      f'AMD EPYC (family/model 25/17), {cores}, avx2 avx512f avx512_bf16; '
      f'no accelerator; jax {m["jax"]}; code {m["code"]}'
  )


def test_the_code_is_named_by_its_commit_or_unknown(monkeypatch):
  # The tests run from a git checkout (CI clones one): a short hash.
  assert re.fullmatch(r'[0-9a-f]{7,}(-dirty)?', machine.code_version())

  def no_git(*args, **kwargs):
    raise FileNotFoundError('git')

  machine.code_version.cache_clear()
  monkeypatch.setattr(machine.subprocess, 'run', no_git)
  try:
    assert machine.code_version() == 'unknown'
  finally:
    machine.code_version.cache_clear()


def test_a_cpu_without_avx2_or_cpuinfo_is_still_described(monkeypatch):
  monkeypatch.setattr(machine, '_cpuinfo', dict)
  m = machine.describe()
  assert m['cpu_features'] == [] and m['cpu_family_model'] == ''
  assert 'no AVX2' in machine.summary(m)


def test_bfloat16_is_native_with_avx512_bf16_amx_or_an_accelerator():
  zen4 = {'accelerator': 'none', 'cpu_features': ['avx2', 'avx512_bf16']}
  zen3 = {'accelerator': 'none', 'cpu_features': ['avx2']}
  gpu = {'accelerator': '1 x NVIDIA H200', 'cpu_features': ['avx2']}
  assert machine.native_bfloat16(zen4) == (True, 'the CPU has avx512_bf16')
  assert machine.native_bfloat16(gpu)[0]
  native, why = machine.native_bfloat16(zen3)
  assert not native and 'neither AMX nor AVX512_BF16' in why


@pytest.mark.parametrize(
    'native, dtype', [(True, 'bfloat16'), (False, 'float32')]
)
def test_auto_dtype_follows_the_machine_and_an_explicit_one_wins(
    monkeypatch, native, dtype
):
  monkeypatch.setattr(machine, 'native_bfloat16', lambda: (native, 'test'))
  cfg = vit_config.get_config('cpu').model
  assert cfg.dtype == 'auto'
  assert models.create(cfg, 10).dtype == dtype
  explicit = dict(cfg, dtype='float32')
  assert models.create(explicit, 10).dtype == 'float32'
