"""A run's folder: its lock and its records (config, split, class names).

What a workdir holds:
  config.json               the training config; a rerun must match it
  split.json                the train / validation split it trained on
  classes.json              its class names, in label order (for serving)
  steps/<step>/             orbax checkpoints (vitjax/checkpoint.py)
  metrics.jsonl             a record per log window and per validation
  events.out.tfevents.*     the same metrics for TensorBoard
  eval/                     reports and figures (vitjax/evaluate.py)
  int8/<checkpoint>/        a frozen int8 model (vitjax/quantization.py)
  calibration.json          A-ViT's calibrated halting gate
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from absl import logging
import jax
from ml_collections import ConfigDict

from vitjax import errors
from vitjax.data import sources


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


# Config fields added after runs were saved, with the value those runs ran
# with: a run saved without them resumes under the same command.
_ADDED_SINCE = {
    'model': {'kernels': 'cpu', 'patch_dropout': 0.0},
    'train': {'resume_from': '', 'final_evaluation': True},
    # How a checkpoint is evaluated in int8 is not part of its training:
    # older runs take today's defaults.
    'eval': {
        'quant_activations': 'static',
        'quant_calibration_images': 1024,
        'quant_fold_norms': True,
    },
}


def save_or_check_config(
    config: ConfigDict, workdir: Path, *, fresh: bool
) -> None:
  """Writes config.json; a rerun must use the same training config.

  fresh: the workdir holds no checkpoint yet, so a config.json there is
  from a start that saved nothing (say one stopped by a start check), and
  is replaced.
  """
  path = workdir / 'config.json'
  if path.exists() and not fresh:
    diffs = config_differences(workdir, config)
    if diffs:
      raise errors.ConfigError(
          f'workdir {str(workdir)!r} holds a run with another config: '
          + '; '.join(diffs[:5])
          + '. Rerun with the same config and '
          'overrides to resume it, or pass a new --workdir.'
      )
  elif jax.process_index() == 0:
    _write_json(path, json.loads(config.to_json_best_effort()))


def config_differences(workdir: Path, config: ConfigDict) -> list[str]:
  """How `config` differs from the run saved in workdir's config.json, in
  what training depends on ('eval.x was 1, now 2'; evaluation settings may
  change between runs without harm)."""
  saved = saved_config(workdir).to_dict()
  diffs = _config_diff(saved, json.loads(config.to_json_best_effort()))
  return [d for d in diffs if not d.startswith('eval.')]


def saved_config(workdir: Path) -> ConfigDict:
  """The run's config.json, with the fields added since it was written
  set to what such a run did (a run before model.kernels ran 'cpu')."""
  saved = json.loads((Path(workdir) / 'config.json').read_text())
  for section, fields in _ADDED_SINCE.items():
    for field, value in fields.items():
      saved.setdefault(section, {}).setdefault(field, value)
  return ConfigDict(saved)


def _write_json(path: Path, value: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
  tmp.replace(path)


def check_split(
    workdir: Path, split_id: dict[str, Any], *, record: bool
) -> None:
  """The data split must be the one the run in `workdir` trained on:
  otherwise its validation (and a fine-tune's) may hold its training images.

  record: the run in `workdir` has saved no checkpoint yet: its split is
  this one (split.json is written). Otherwise a missing split.json (a run
  from before vitjax kept them) is only warned about.
  """
  path = workdir / 'split.json'
  if record:
    if jax.process_index() == 0:
      _write_json(path, split_id)
    return
  if not path.exists():
    logging.warning(
        '%s has no split.json (it predates them): its data split cannot be '
        'checked.',
        workdir,
    )
    return
  diffs = _config_diff(json.loads(path.read_text()), split_id)
  if diffs:
    raise sources.DataError(
        f'the data split differs from the one the run in {str(workdir)!r} '
        f'trained on: {"; ".join(diffs)}. Its validation could hold its '
        'training images. Use the data settings of its config.json (seed, '
        'data.val_fraction, data.source, the same image folders), or train '
        'it again.'
    )


def _config_diff(saved: dict, current: dict, prefix: str = '') -> list[str]:
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, '<absent>'), current.get(k, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k} was {a!r}, now {b!r}')
  return out


CLASSES_FILE = 'classes.json'


def record_class_names(workdir: Path, names) -> None:
  """Writes the run's class names (label order) for serving."""
  _write_json(Path(workdir) / CLASSES_FILE, list(names))


def class_names(workdir: Path) -> list[str]:
  """The run's class names: classes.json, or (runs from before it was
  written) an evaluation report's."""
  path = workdir / CLASSES_FILE
  if path.exists():
    return json.loads(path.read_text())
  for report in sorted((workdir / 'eval').glob('report_*.json')):
    return json.loads(report.read_text())['class_names']
  raise errors.UserError(
      f'{str(workdir)!r} records no class names (no {CLASSES_FILE}, no '
      'evaluation report): evaluate it once, with the config that trained '
      f'it: python -m vitjax.main --config=... --workdir={workdir} '
      '--mode=eval'
  )
