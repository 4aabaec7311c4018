"""A run's folder: its lock, its records, and the metrics it writes.

What a workdir holds:
  config.json               the training config; a rerun must match it
  run.json                  the vitjax version that wrote it, the train /
                            validation split it trained on, its class names
  steps/<step>/             orbax checkpoints (vitjax/checkpoint.py)
  metrics.jsonl             a record per log window and per validation
  events.out.tfevents.*     the same metrics for TensorBoard
  eval/                     reports and figures (vitjax/evaluate.py)
  int8/<checkpoint>/        a frozen int8 model (vitjax/quant/server.py)
  calibration.json          A-ViT's calibrated halting gate

A workdir written by another minor version of vitjax is refused: train it
again with this one.
"""

from __future__ import annotations

import collections
import fcntl
import importlib.util
import json
import os
from pathlib import Path
import sys
import types
from typing import Any, Mapping

from absl import logging
import jax
from ml_collections import ConfigDict
import numpy as np

import vitjax
from vitjax import checkpoint, errors
from vitjax.data import sources

RUN_FILE = 'run.json'
METRICS_FILE = 'metrics.jsonl'


class WorkdirLock:
  """An exclusive lock on a workdir, released on exit or when the process
  ends."""

  def __init__(self, workdir: Path):
    workdir.mkdir(parents=True, exist_ok=True)
    self._file = open(workdir / '.lock', 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read()
      self._file.close()
      raise _in_use(workdir, holder) from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    self._file.flush()

  @staticmethod
  def check_free(workdir: Path) -> None:
    """Raises if a live run holds the lock, without taking it: the other
    processes of a multi-process run check before they join it."""
    path = workdir / '.lock'
    if not path.exists():
      return
    with open(path) as f:
      try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except BlockingIOError:
        raise _in_use(workdir, f.read()) from None
      fcntl.flock(f, fcntl.LOCK_UN)

  def __enter__(self) -> 'WorkdirLock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def release(self) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def _in_use(workdir: Path, holder: str) -> errors.UserError:
  return errors.UserError(
      f'workdir {str(workdir)!r} is in use by a live run '
      f'({holder.strip() or "another process"}). Wait for it to finish, stop '
      'it, or pass another --workdir.'
  )


def record(workdir: Path, config: ConfigDict, data: sources.Dataset) -> None:
  """A fresh run's records: config.json and run.json (process 0)."""
  if jax.process_index() == 0:
    write_json(
        workdir / 'config.json', json.loads(config.to_json_best_effort())
    )
    write_json(
        workdir / RUN_FILE,
        {
            'vitjax_version': vitjax.__version__,
            'split': data.split_id,
            'class_names': list(data.class_names),
        },
    )


def _run_record(workdir: Path) -> dict[str, Any]:
  """run.json, from a run of this version of vitjax; else a UserError."""
  workdir = Path(workdir)
  if not (workdir / 'config.json').exists():
    raise checkpoint.CheckpointError(
        f'{str(workdir)!r} holds no run (no config.json). Train first: '
        f'python -m vitjax.main --config=<its config> --workdir={workdir}'
    )
  path = workdir / RUN_FILE
  version = (
      json.loads(path.read_text())['vitjax_version']
      if path.exists()
      else '0.1.0 or earlier'
  )
  if version.split('.')[:2] != vitjax.__version__.split('.')[:2]:
    raise errors.UserError(
        f'{str(workdir)!r} holds a run of vitjax {version}, which this '
        f'vitjax ({vitjax.__version__}) does not read: train it again in a '
        'new --workdir.'
    )
  return json.loads(path.read_text())


def saved_config(workdir: Path) -> ConfigDict:
  """The config of the run in `workdir` (config.json)."""
  _run_record(workdir)
  return ConfigDict(json.loads((Path(workdir) / 'config.json').read_text()))


def class_names(workdir: Path) -> list[str]:
  """The run's class names, in label order."""
  return _run_record(workdir)['class_names']


def check_config(config: ConfigDict, workdir: Path) -> None:
  """A rerun on a workdir with checkpoints must use its training config."""
  diffs = config_differences(workdir, config)
  if diffs:
    raise errors.ConfigError(
        f'workdir {str(workdir)!r} holds a run with another config: '
        + '; '.join(diffs[:5])
        + '. Rerun with the same config and overrides to resume it, or '
        'pass a new --workdir.'
    )


# The one evaluation setting that training reads: which weights validation
# scores, so which checkpoint is the best.
_TRAINING_EVAL_FIELDS = ('use_ema',)


def config_differences(workdir: Path, config: ConfigDict) -> list[str]:
  """How `config` differs from the run saved in workdir, in what training
  depends on ('optim.lr was 0.001, now 0.002'; other evaluation settings
  may change between runs without harm)."""
  saved = saved_config(workdir).to_dict()
  current = json.loads(config.to_json_best_effort())
  for fields in (saved, current):
    fields['eval'] = {
        k: v
        for k, v in fields.get('eval', {}).items()
        if k in _TRAINING_EVAL_FIELDS
    }
  return _differences(saved, current)


def check_split(workdir: Path, split_id: dict[str, Any]) -> None:
  """The data split must be the one the run in `workdir` trained on:
  otherwise its validation (and a fine-tune's) may hold its training
  images."""
  diffs = _differences(_run_record(workdir)['split'], split_id)
  if diffs:
    raise sources.DataError(
        f'the data split differs from the one the run in {str(workdir)!r} '
        f'trained on: {"; ".join(diffs)}. Its validation could hold its '
        'training images. Use the data settings of its config.json (seed, '
        'data.val_fraction, data.source, the same image folders), or train '
        'it again.'
    )


def _differences(saved: dict, current: dict, prefix: str = '') -> list[str]:
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, '<absent>'), current.get(k, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k} was {a!r}, now {b!r}')
  return out


def write_json(path: Path, value: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
  tmp.replace(path)


# --- metrics -------------------------------------------------------------


def writers(
    workdir: Path, resume_step: int, total_steps: int | None, log_every: int
):
  """What a run writes while it trains: clu's default writer (the log on
  every process; TensorBoard events on process 0) with metrics.jsonl on
  process 0, and clu's progress report every `log_every` steps (steps/s,
  and the ETA of a run of `total_steps`). Returns (writer,
  report_progress)."""
  _tensorboard_without_tensorflow()
  # pylint: disable=g-import-not-at-top
  from clu import metric_writers, periodic_actions

  main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(
      workdir, just_logging=not main, asynchronous=False
  )
  if main:
    writer = metric_writers.MultiWriter(
        [writer, JsonlWriter(workdir / METRICS_FILE, resume_step)]
    )
  progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, every_steps=log_every, every_secs=None
  )
  return writer, progress


def _tensorboard_without_tensorflow() -> None:
  """Where TensorFlow is not installed (the GPU image, which cannot carry
  it), stands in for clu's TensorFlow summary writer with one built on the
  `tensorboard` package's own event writer, for scalars: clu's
  metric_writers package imports TensorFlow's writer when it loads, so
  without this none of its writers would load. Called before clu's writers
  are first imported."""
  name = 'clu.metric_writers.summary_writer'
  if name in sys.modules or importlib.util.find_spec('tensorflow'):
    return
  module = types.ModuleType(name, _TensorboardScalarWriter.__doc__)
  module.SummaryWriter = _TensorboardScalarWriter
  sys.modules[name] = module


class _TensorboardScalarWriter:
  """clu's MetricWriter interface over tensorboard's event writer, for
  scalars, which are all vitjax writes (other summaries are dropped with a
  warning). It cannot subclass clu's MetricWriter: that module loads the
  one this class stands in for."""

  def __init__(self, logdir: str):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._event, self._summary = event_pb2, summary_pb2
    self._writer = EventFileWriter(str(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = [
        self._summary.Summary.Value(tag=k, simple_value=float(v))
        for k, v in scalars.items()
    ]
    self._writer.add_event(
        self._event.Event(
            step=int(step), summary=self._summary.Summary(value=values)
        )
    )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams  # a run's config.json holds them

  def _dropped(self, step, values, *args, **kwargs) -> None:
    del args, kwargs
    logging.warning(
        'step %d: %s not written (TensorBoard without TensorFlow takes '
        'scalars only).',
        step,
        sorted(values),
    )

  write_summaries = write_images = write_videos = _dropped
  write_audios = write_texts = write_histograms = _dropped

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class JsonlWriter:
  """Scalars as JSON lines, a record per write and split: scalars named
  `train/...` and `val/...` become `{"split": "train", "step": ...,
  ...}`; plots and reports read them (`read_records`). On resume it is cut
  back to the resumed step, so records of steps that a killed run never
  saved are written again, once. Scalars only: clu's MultiWriter calls
  only what is written."""

  def __init__(self, path: Path, resume_step: int = 0):
    self.path = Path(path)
    if self.path.exists():
      keep = [
          json.dumps(r)
          for r in read_records(self.path)
          if r['step'] <= resume_step
      ]
      _write_lines(self.path, keep)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    records = collections.defaultdict(dict)
    for key, value in scalars.items():
      split, _, name = key.rpartition('/')
      records[split][name] = np.asarray(value).tolist()
    with open(self.path, 'a') as f:
      for split, values in records.items():
        f.write(
            json.dumps({'split': split, 'step': int(step), **values}) + '\n'
        )

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _write_lines(path: Path, lines: list[str]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(''.join(line + '\n' for line in lines))
  tmp.replace(path)


def read_records(path: Path) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl; a line cut short by a kill or a full
  disk is skipped with a warning."""
  if not Path(path).exists():
    return []
  records = []
  for number, line in enumerate(Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      logging.warning(
          '%s line %d is not JSON (cut short?); skipped.', path, number
      )
  return records


def copy_records(source: Path, destination: Path, up_to_step: int) -> None:
  """Starts `destination`'s metrics afresh with `source`'s up to a step: a
  run continued from another keeps the curves that led to it."""
  if jax.process_index() == 0:
    _write_lines(
        destination / METRICS_FILE,
        [
            json.dumps(r)
            for r in read_records(source / METRICS_FILE)
            if r['step'] <= up_to_step
        ],
    )
