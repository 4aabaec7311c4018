"""scripts/study.py: its runs' settings, its statistics, its resumption."""

import importlib.util
import json
from pathlib import Path
import sys

from absl import app
import numpy as np
import pytest

import vitjax
from vitjax import workdir

_SPEC = importlib.util.spec_from_file_location(
    'study', Path(__file__).parent.parent / 'scripts' / 'study.py'
)
study = importlib.util.module_from_spec(_SPEC)
sys.modules['study'] = study  # dataclasses look their module up
_SPEC.loader.exec_module(study)

BY_NAME = {t.name: t for t in study.TREATMENTS}


def test_the_set_holds_each_treatment_the_issue_asks_for_once():
  settings = {
      (t.sampling, t.loss, t.class_weights, t.deferred)
      for t in study.TREATMENTS
  }
  assert len(settings) == len(study.TREATMENTS) == 8
  # One correction each: no weights or adjustment under resampling.
  for t in study.TREATMENTS:
    corrections = (
        (t.sampling != 'natural')
        + (t.loss != 'ce')
        + (t.class_weights != 'none')
    )
    assert corrections == (t.name != study.BASELINE), t.name


def test_a_run_is_the_config_with_the_schedule_and_the_treatment():
  overrides = study.run_overrides(
      BY_NAME['drw'], seed=2, epochs=2.0, extra=['model.depth=3']
  )
  config = study.intended_config('configs/vit.py:smoke', overrides)
  assert config.seed == 2 and config.model.depth == 3
  assert config.train.epochs == 2.0 and config.train.time_budget_minutes == 0
  assert config.train.eval_every_epochs == 0.5
  assert config.loss.name == 'ce' and config.loss.class_weights == 'effective'
  assert config.loss.reweight_from_epoch == pytest.approx(1.6)
  assert config.model.dtype in ('float32', 'bfloat16')  # resolved, as run
  assert config.model.patch_dropout == 0.0  # as docs/imbalance.md's study ran
  with pytest.raises(app.UsageError, match='loss.name'):
    study.run_overrides(BY_NAME['focal'], 0, 2.0, ['loss.name=ce'])


def test_a_workdir_with_other_settings_is_refused(tmp_path):
  make = lambda seed: study.intended_config(
      'configs/vit.py:smoke',
      study.run_overrides(BY_NAME['focal'], seed, 1.0, []),
  )
  (tmp_path / 'config.json').write_text(make(0).to_json_best_effort())
  (tmp_path / workdir.RUN_FILE).write_text(
      json.dumps({'vitjax_version': vitjax.__version__})
  )
  assert not study.is_finished(tmp_path, make(0))  # no report yet
  with pytest.raises(SystemExit, match='seed was 0, now 1'):
    study.is_finished(tmp_path, make(1))


def _report(acc, step=10, recall=None):
  recall = recall or [acc] * 10
  return {
      'step': step,
      'total_steps': 20,
      'test': {
          'balanced_accuracy': acc,
          'accuracy': acc,
          'worst_class_recall': min(recall),
          'per_class_recall': recall,
      },
      'val': {'balanced_accuracy': acc - 0.01},
  }


def test_differences_are_paired_seed_by_seed():
  runs = {
      'natural_ce': [_report(a) for a in (0.50, 0.60, 0.70)],
      # Seed to seed the spread is 10 points, but always 1 point better.
      'focal': [_report(a, step=20) for a in (0.51, 0.61, 0.71)],
      'sqrt': [_report(a) for a in (0.52, 0.58, 0.70)],
  }
  rows = study.summarize(runs, minority=[8, 9])
  focal = rows['focal']['difference_from_baseline']
  assert focal['mean'] == pytest.approx(0.01)
  assert focal['standard_error'] == pytest.approx(0.0, abs=1e-9)
  assert focal['measurable']
  assert not rows['sqrt']['difference_from_baseline']['measurable']
  assert rows['focal']['balanced_accuracy']['std'] == pytest.approx(0.1)
  assert rows['focal']['best_step_share'] == [1.0, 1.0, 1.0]
  names = [f'c{i}' for i in range(10)]
  table = study.markdown(
      rows, [BY_NAME[n] for n in runs], names, [8, 9], '# heading'
  )
  assert '+1.00 ± 0.00 (measurable)' in table
  assert '(within spread)' in table and 'c8 + c9 recall' in table
  assert np.isnan(
      study.summarize({'focal': runs['focal'][:1]}, [8])['focal'][
          'balanced_accuracy'
      ]['std']
  )
