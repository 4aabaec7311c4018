"""scripts/benchmark.py end to end on the smoke configs: a fine-tune's
training step, int8 and its profile, the block measure."""

from pathlib import Path
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env

pytest.importorskip('aqt')
pytestmark = pytest.mark.slow  # every test starts the script

_ROOT = Path(__file__).resolve().parent.parent


def _script(*args: str) -> str:
  out = subprocess.run(
      [sys.executable, *args],
      cwd=_ROOT,
      env=subprocess_env(1),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_benchmark_times_a_fine_tune_and_its_int8_and_profiles_them():
  out = _script(
      'scripts/benchmark.py',
      '--config=configs/dynamic_vit.py:smoke',
      '--config.eval.speed_batch=8',
      '--int8',
      '--profile',
      '--repeats=1',
      '--seconds=0.01',
  )
  # The fine-tune's own training step, against a teacher of random weights.
  assert 'config: model dynamic_vit ' in out, out
  for name in ('train', 'infer', 'infer@1', 'int8', 'int8@1'):
    assert f'config {name} ' in out, out
  assert 'config int8 over float, batch 1:' in out
  # The profile of the int8 program: its int8 dots, sorted into kinds.
  # (2 blocks x q, k, v, out, fc1, fc2; the token predictors stay float.)
  assert '12 int8 dots in its HLO' in out, out
  assert 'int8 matmul' in out and 'quantize activations' in out


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
