"""Where run metrics go: one clu MultiWriter of the log, TensorBoard events
and metrics.jsonl.

metrics.jsonl holds a record per write and split (`{"split": "train"|"val",
"step": ..., "epoch": ..., ...}`, from scalars named `train/...` and
`val/...`); plots and the comparison report read it. On resume it is cut
back to the resumed step, so records of steps that a killed run never
saved are written again, once.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Mapping

from absl import logging
from clu import metric_writers as clu_writers
import jax
import numpy as np


class JsonlWriter(clu_writers.MetricWriter):
  """Scalars as JSON lines, one record per split (the key's prefix)."""

  def __init__(self, path: Path, resume_step: int = 0):
    self.path = Path(path)
    self._trim_after(resume_step)

  def _trim_after(self, step: int) -> None:
    """Drops records past `step`, written by a run that died before saving."""
    if not self.path.exists():
      return
    keep = [json.dumps(r) for r in read_records(self.path) if r['step'] <= step]
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(''.join(line + '\n' for line in keep))
    tmp.replace(self.path)

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

  # Only scalars belong in metrics.jsonl.
  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


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
  """Starts `destination` afresh with the records of `source` up to a
  step: a run continued from another keeps the curves that led to it."""
  if not Path(source).exists() or jax.process_index() != 0:
    return
  records = [r for r in read_records(source) if r['step'] <= up_to_step]
  destination.parent.mkdir(parents=True, exist_ok=True)
  destination.write_text(''.join(json.dumps(r) + '\n' for r in records))


def create(workdir: Path, resume_step: int) -> clu_writers.MetricWriter:
  """The log on every process; TensorBoard and metrics.jsonl on process 0."""
  writers = [clu_writers.LoggingWriter()]
  if jax.process_index() == 0:
    writers += [
        clu_writers.SummaryWriter(str(workdir)),
        JsonlWriter(workdir / 'metrics.jsonl', resume_step),
    ]
  return clu_writers.MultiWriter(writers)
