"""The machine a figure was measured on, and the code: every timing the
project prints or saves names both.

The same "AMD EPYC" can be a Zen 3 (AVX2 only) or a Zen 4 (AVX-512 with
bfloat16), which time this project 2-3x apart, so the CPU is named by its
model name, family and model numbers, and the instruction sets that decide
which kernels XLA can use here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
import platform
import subprocess
from typing import Any

import jax
import jaxlib

# What decides matmul speed on a CPU: AVX2 only, AVX-512, native bfloat16
# dot products, Intel AMX tiles.
CPU_FEATURES = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_int8')


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  try:
    text = Path('/proc/cpuinfo').read_text()
  except OSError:
    return {}
  fields = {}
  for line in text.split('\n\n')[0].splitlines():
    key, _, value = line.partition(':')
    fields[key.strip()] = value.strip()
  return fields


@functools.cache
def code_version() -> str:
  """This package's git commit, '-dirty' when tracked files differ from it
  (read once per process), or 'unknown': no git, or a copy installed
  outside its checkout."""
  root = Path(__file__).resolve().parents[2]
  git = lambda *args: subprocess.run(
      ['git', '-C', str(root), *args],
      capture_output=True,
      text=True,
      check=True,
      timeout=30,
  ).stdout.strip()
  try:
    if Path(git('rev-parse', '--show-toplevel')).resolve() != root:
      return 'unknown'
    commit = git('rev-parse', '--short', 'HEAD')
    dirty = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return commit + ('-dirty' if dirty else '')


def describe() -> dict[str, Any]:
  """The CPU, its usable cores and features, the accelerators, the
  versions of jax and jaxlib, and the code's commit."""
  return _hardware() | {'code': code_version()}


def _hardware() -> dict[str, Any]:
  """describe() without the code's commit: what choosing a dtype reads,
  without running git at every model's creation."""
  info = _cpuinfo()
  flags = set(info.get('flags', '').split())
  devices = jax.devices()
  return {
      'cpu': info.get('model name') or platform.processor() or 'unknown',
      'cpu_family_model': (
          f'{info["cpu family"]}/{info["model"]}'
          if 'cpu family' in info and 'model' in info
          else ''
      ),
      'cpu_cores': (
          len(os.sched_getaffinity(0))
          if hasattr(os, 'sched_getaffinity')
          else os.cpu_count()
      ),
      'cpu_features': [f for f in CPU_FEATURES if f in flags],
      'accelerator': (
          'none'
          if devices[0].platform == 'cpu'
          else f'{len(devices)} x {devices[0].device_kind}'
      ),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
  }


def native_bfloat16(machine: dict[str, Any] | None = None) -> tuple[bool, str]:
  """Whether the machine computes bfloat16 natively, and why (what
  model.dtype='auto' follows)."""
  machine = machine or _hardware()
  if machine['accelerator'] != 'none':
    return True, f'{machine["accelerator"]} computes bfloat16 natively'
  native = [
      f for f in ('amx_bf16', 'avx512_bf16') if f in machine['cpu_features']
  ]
  if native:
    return True, f'the CPU has {" and ".join(native)}'
  return False, (
      'the CPU has neither AMX nor AVX512_BF16, so bfloat16 would be '
      'converted to and from float32 around every operation'
  )


def summary(machine: dict[str, Any]) -> str:
  """One line, e.g. 'AMD EPYC (family/model 25/17), 2 cores, avx2 avx512f
  avx512_bf16; no accelerator; jax 0.10.2; code 6ac86a8'."""
  cpu = machine['cpu']
  if machine.get('cpu_family_model'):
    cpu += f' (family/model {machine["cpu_family_model"]})'
  features = ' '.join(machine['cpu_features']) or 'no AVX2'
  accelerator = machine['accelerator']
  cores = machine['cpu_cores']
  return (
      f'{cpu}, {cores} core{"" if cores == 1 else "s"}, {features}; '
      f'{"no accelerator" if accelerator == "none" else accelerator}; '
      f'jax {machine["jax"]}; code {machine["code"]}'
  )
