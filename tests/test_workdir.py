"""A run's folder: its lock, the version that wrote it, and its metrics
through clu's writers (also without TensorFlow)."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest

import vitjax
from vitjax import checkpoint, errors, workdir

from configs import vit as vit_config
from tests.conftest import subprocess_env


def test_a_live_workdir_is_locked(tmp_path):
  lock = workdir.WorkdirLock(tmp_path)
  with pytest.raises(errors.UserError, match='in use by a live run'):
    workdir.WorkdirLock(tmp_path)
  lock.release()
  workdir.WorkdirLock(tmp_path).release()


@pytest.mark.parametrize(
    'run_json, version',
    [(None, '0.1.0 or earlier'), ({'vitjax_version': '0.3.1'}, '0.3.1')],
)
def test_a_workdir_of_another_version_is_refused_in_one_line(
    tmp_path, run_json, version
):
  (tmp_path / 'config.json').write_text('{}')
  if run_json:
    (tmp_path / workdir.RUN_FILE).write_text(json.dumps(run_json))
  with pytest.raises(errors.UserError) as refused:
    workdir.saved_config(tmp_path)
  message = str(refused.value)
  assert f'holds a run of vitjax {version}' in message
  assert vitjax.__version__ in message and 'train it again' in message
  assert '\n' not in message


def test_a_folder_without_a_run_says_to_train_first(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='Train first'):
    workdir.class_names(tmp_path)


def test_jsonl_records_per_split_and_resume_trims(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  writer = workdir.JsonlWriter(path)
  writer.write_scalars(5, {'train/loss': 2.0, 'train/epoch': 0.5})
  writer.write_scalars(10, {'train/loss': 1.5, 'val/accuracy': 0.25})
  assert workdir.read_records(path) == [
      {'split': 'train', 'step': 5, 'loss': 2.0, 'epoch': 0.5},
      {'split': 'train', 'step': 10, 'loss': 1.5},
      {'split': 'val', 'step': 10, 'accuracy': 0.25},
  ]
  workdir.JsonlWriter(path, resume_step=5)  # a resume from step 5
  assert [r['step'] for r in workdir.read_records(path)] == [5]


def test_a_line_cut_short_is_skipped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(
      '{"split": "train", "step": 5, "loss": 2.0}\n' '{"split": "train", "st'
  )
  assert workdir.read_records(path) == [
      {'split': 'train', 'step': 5, 'loss': 2.0}
  ]
  workdir.JsonlWriter(path, resume_step=5)
  assert path.read_text() == '{"split": "train", "step": 5, "loss": 2.0}\n'


@pytest.mark.slow
def test_clu_writers_and_progress_load_without_tensorflow(tmp_path):
  # The GPU image has no TensorFlow: vitjax stands in for clu's writer.
  script = textwrap.dedent(f"""
      import sys
      sys.modules['tensorflow'] = None  # as if it were not installed
      from pathlib import Path
      from vitjax import train, workdir
      writer, progress = workdir.writers(Path({str(tmp_path)!r}), 0, 10, 2)
      writer.write_scalars(1, {{'train/loss': 1.0}})
      from clu import metric_writers  # with the stand-in, which drops images
      metric_writers.create_default_writer(
          Path({str(tmp_path / 'images')!r}), asynchronous=False
      ).write_images(1, {{'x': __import__('numpy').zeros((1, 2, 2, 3))}})
      # clu's progress line at log steps (the first call only starts it).
      assert [progress(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
      writer.close()
      assert sys.modules['tensorflow'] is None
  """)
  stderr = subprocess.run(
      [sys.executable, '-c', script],
      check=True,
      timeout=120,
      env=subprocess_env(1),
      capture_output=True,
      text=True,
  ).stderr
  assert "['x'] not written (TensorBoard without TensorFlow" in stderr
  assert list(tmp_path.glob('events.out.tfevents.*'))
  assert json.loads((tmp_path / 'metrics.jsonl').read_text()) == {
      'split': 'train',
      'step': 1,
      'loss': 1.0,
  }


def test_a_resume_keeps_what_training_reads_eval_use_ema_too(tmp_path):
  config = vit_config.get_config('smoke')
  workdir.write_json(
      tmp_path / 'config.json', json.loads(config.to_json_best_effort())
  )
  workdir.write_json(
      tmp_path / workdir.RUN_FILE, {'vitjax_version': vitjax.__version__}
  )
  changed = copy.deepcopy(config)
  changed.eval.batch_size *= 2  # evaluation alone: free to change
  workdir.check_config(changed, tmp_path)
  # Which weights validation scores decides which checkpoint is best.
  changed.eval.use_ema = not config.eval.use_ema
  with pytest.raises(errors.ConfigError, match='eval.use_ema was True'):
    workdir.check_config(changed, tmp_path)
  changed = copy.deepcopy(config)
  changed.optim.lr *= 2
  with pytest.raises(errors.ConfigError, match='optim.lr was'):
    workdir.check_config(changed, tmp_path)
