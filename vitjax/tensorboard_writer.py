"""TensorBoard scalars without TensorFlow, for clu where TensorFlow is absent.

clu's metric writers and periodic actions import its TensorFlow
SummaryWriter when they load, so without TensorFlow (the GPU image) none of
them loads. `stand_in_for_clu_summary_writer` registers this writer, built
on the `tensorboard` package's own event writer, as that module; importing
`vitjax` does it, before anything imports clu.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Mapping

from absl import logging

_CLU_MODULE = 'clu.metric_writers.summary_writer'


class TensorboardScalarWriter:
  """clu's MetricWriter interface over the tensorboard package's event writer.

  Scalars only, which is all vitjax writes: other summaries are dropped with
  a warning. (It cannot subclass clu's MetricWriter: that module loads the
  one this class stands in for.)
  """

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


def stand_in_for_clu_summary_writer() -> None:
  if _CLU_MODULE in sys.modules or importlib.util.find_spec('tensorflow'):
    return
  module = types.ModuleType(_CLU_MODULE, __doc__)
  module.SummaryWriter = TensorboardScalarWriter
  sys.modules[_CLU_MODULE] = module
