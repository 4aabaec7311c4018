"""scripts/benchmark.py end to end on the smoke config: int8 and profile."""

import os
from pathlib import Path
import subprocess
import sys

import pytest

pytest.importorskip('aqt')

_ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_times_int8_beside_float_and_profiles_both():
  out = subprocess.run(
      [
          sys.executable,
          'scripts/benchmark.py',
          '--config=configs/vit.py:smoke',
          '--config.eval.speed_batch=8',
          '--int8',
          '--profile',
          '--repeats=1',
          '--seconds=0.01',
      ],
      cwd=_ROOT,
      env=os.environ | {'PYTHONPATH': str(_ROOT)},
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  out = out.stdout
  for name in ('train', 'infer', 'infer@1', 'int8', 'int8@1'):
    assert f'config {name} ' in out, out
  assert 'config int8 over float, batch 1:' in out
  # The profile of the int8 program: its int8 dots, sorted into kinds.
  # (2 blocks x q, k, v, out, fc1, fc2.)
  assert '12 int8 dots in its HLO' in out, out
  assert 'int8 matmul' in out and 'quantize activations' in out
