"""metrics.jsonl through clu's writers, and clu without TensorFlow."""

import json
import subprocess
import sys
import textwrap

from vitjax import metric_writers


def test_jsonl_records_per_split_and_resume_trims(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  writer = metric_writers.JsonlWriter(path)
  writer.write_scalars(5, {'train/loss': 2.0, 'train/epoch': 0.5})
  writer.write_scalars(10, {'train/loss': 1.5, 'val/accuracy': 0.25})
  assert metric_writers.read_records(path) == [
      {'split': 'train', 'step': 5, 'loss': 2.0, 'epoch': 0.5},
      {'split': 'train', 'step': 10, 'loss': 1.5},
      {'split': 'val', 'step': 10, 'accuracy': 0.25},
  ]
  metric_writers.JsonlWriter(path, resume_step=5)  # a resume from step 5
  assert [r['step'] for r in metric_writers.read_records(path)] == [5]


def test_a_line_cut_short_is_skipped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(
      '{"split": "train", "step": 5, "loss": 2.0}\n' '{"split": "train", "st'
  )
  assert metric_writers.read_records(path) == [
      {'split': 'train', 'step': 5, 'loss': 2.0}
  ]
  metric_writers.JsonlWriter(path, resume_step=5)
  assert path.read_text() == '{"split": "train", "step": 5, "loss": 2.0}\n'


def test_clu_writers_and_progress_load_without_tensorflow(tmp_path):
  # The GPU image has no TensorFlow: vitjax stands in for clu's writer.
  script = textwrap.dedent(f"""
      import sys
      sys.modules['tensorflow'] = None  # as if it were not installed
      from pathlib import Path
      from vitjax import metric_writers, train
      from clu import periodic_actions
      writer = metric_writers.create(Path({str(tmp_path)!r}), 0)
      writer.write_scalars(1, {{'train/loss': 1.0}})
      writer.write_images(1, {{'x': __import__('numpy').zeros((1, 2, 2, 3))}})
      writer.close()
      assert sys.modules['tensorflow'] is None
  """)
  subprocess.run([sys.executable, '-c', script], check=True, timeout=120)
  assert list(tmp_path.glob('events.out.tfevents.*'))
  assert json.loads((tmp_path / 'metrics.jsonl').read_text()) == {
      'split': 'train',
      'step': 1,
      'loss': 1.0,
  }
