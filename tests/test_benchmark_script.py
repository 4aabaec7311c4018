"""scripts/benchmark.py end to end on the smoke configs: int8 and its
profile, a fine-tune's training step, the block measure."""

import os
from pathlib import Path
import subprocess
import sys

import pytest

pytest.importorskip('aqt')

_ROOT = Path(__file__).resolve().parent.parent


def _script(*args: str) -> str:
  out = subprocess.run(
      [sys.executable, *args],
      cwd=_ROOT,
      env=os.environ | {'PYTHONPATH': str(_ROOT)},
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_benchmark_times_int8_beside_float_and_profiles_both():
  out = _script(
      'scripts/benchmark.py',
      '--config=configs/vit.py:smoke',
      '--config.eval.speed_batch=8',
      '--int8',
      '--profile',
      '--repeats=1',
      '--seconds=0.01',
  )
  for name in ('train', 'infer', 'infer@1', 'int8', 'int8@1'):
    assert f'config {name} ' in out, out
  assert 'config int8 over float, batch 1:' in out
  # The profile of the int8 program: its int8 dots, sorted into kinds.
  # (2 blocks x q, k, v, out, fc1, fc2.)
  assert '12 int8 dots in its HLO' in out, out
  assert 'int8 matmul' in out and 'quantize activations' in out


@pytest.mark.parametrize('config', ['dynamic_vit', 'avit'])
def test_benchmark_times_a_fine_tunes_training_step(config):
  out = _script(
      'scripts/benchmark.py',
      f'--config=configs/{config}.py:smoke',
      '--config.eval.speed_batch=8',
      '--repeats=1',
      '--seconds=0.01',
  )
  assert f'config: model {config} ' in out, out
  assert 'config train ' in out and 'images/s' in out, out


def test_the_block_measure_times_each_token_count_in_both_precisions():
  out = _script(
      'scripts/benchmark.py',
      '--config=configs/vit.py:smoke',
      '--measure=blocks',
      '--tokens=17,5',
      '--repeats=1',
      '--seconds=0.01',
  )
  for dtype in ('float32', 'bfloat16'):
    # The full token count's share of its own cost is 1 in every round.
    assert f'{dtype:9}  17 tokens:' in out, out
    assert 'share 1.00 (IQR 1.00-1.00)' in out, out
    assert f'{dtype:9}   5 tokens:' in out, out
  assert 'code ' in out.splitlines()[0], out
