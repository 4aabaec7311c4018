"""Where run metrics go: TensorBoard events (clu) and a JSON-lines file.

metrics.jsonl holds one record per training log window and per validation
(`{"split": "train"|"val", "step": ..., "epoch": ..., ...}`); plots and the
comparison report read it. TensorBoard events come from clu's writer, which
needs TensorFlow; where TensorFlow is absent (the GPU machine) they are
written with the `tensorboard` package's own event writer instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np


class JsonlLog:
  """Append-only JSON-lines metrics file, trimmed back on resume."""

  def __init__(self, path: Path):
    self.path = path

  def trim_after(self, step: int) -> None:
    """Drops records past `step`, written by a run that died before saving."""
    if not self.path.exists():
      return
    keep = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)['step'] <= step]
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(''.join(line + '\n' for line in keep))
    tmp.replace(self.path)

  def write(self, record: Mapping[str, Any]) -> None:
    if jax.process_index() != 0:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + '\n')


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(v).tolist()
  return v


class _TensorboardOnlyWriter:
  """Scalar TensorBoard events without TensorFlow (tensorboard package)."""

  def __init__(self, logdir: Path):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    self._event, self._summary = event_pb2, summary_pb2
    self._writer = EventFileWriter(str(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = [self._summary.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._writer.add_event(self._event.Event(
        step=int(step), summary=self._summary.Summary(value=values)))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams  # kept in config.json

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def create_writer(workdir: Path):
  """clu's default writer (TensorBoard + logging) or the fallback."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:  # no TensorFlow: clu's writers cannot import
    if jax.process_index() != 0:
      return _NullWriter()
    return _TensorboardOnlyWriter(workdir)
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() != 0)


class _NullWriter:
  def write_scalars(self, step, scalars):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass
