"""Speed measured so that a comparison can be trusted: interleaved timing.

Every images/s figure and every speed-up the project prints comes from
`interleaved`. Timing A for a few seconds and then B for a few seconds lets a
busy moment of the machine (another process, a frequency change) land on
one of them and move their ratio by 20%. Here the candidates take turns,
round after round, on inputs fixed beforehand, and a ratio is computed per
round, between timings taken seconds apart; its median and interquartile
range are what is reported.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

_clock = time.perf_counter  # a test runs the timer on a fake clock


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One thing to time: `call()` does one unit of work (its result is waited
  for) that processes `items` images."""

  call: Callable[[], Any]
  items: int


@dataclasses.dataclass(frozen=True)
class Spread:
  """A median with its interquartile range."""

  median: float
  q25: float
  q75: float

  @classmethod
  def of(cls, values) -> 'Spread':
    q25, median, q75 = np.percentile(np.asarray(values, float), [25, 50, 75])
    return cls(float(median), float(q25), float(q75))

  def format(self, unit: str = '', digits: int = 2) -> str:
    f = lambda v: f'{v:.{digits}f}'
    return f'{f(self.median)}{unit} (IQR {f(self.q25)}-{f(self.q75)})'

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Timings:
  """Per candidate, the seconds of one call in each round."""

  seconds_per_call: Mapping[str, np.ndarray]  # name -> [rounds]
  items: Mapping[str, int]

  def rates(self, name: str) -> np.ndarray:
    return self.items[name] / self.seconds_per_call[name]

  def rate(self, name: str) -> Spread:
    """Images per second."""
    return Spread.of(self.rates(name))

  def ms_per_item(self, name: str) -> Spread:
    """Milliseconds per item: the latency of one, for a call that serves
    its items one at a time, each waited for."""
    return Spread.of(1000.0 / self.rates(name))

  def ratio(self, name: str, baseline: str) -> Spread:
    """How many times faster `name` is than `baseline`, round by round."""
    return Spread.of(self.rates(name) / self.rates(baseline))


def interleaved(
    candidates: Mapping[str, Candidate],
    *,
    rounds: int = 10,
    seconds: float = 0.1,
) -> Timings:
  """Times the candidates in turn, `rounds` times.

  In each round every candidate runs for about `seconds` (at least one
  call), the order reversing from round to round (A B C, C B A, ...) so that
  no candidate always follows the same one. Each call is waited for before
  the next: a batch-1 figure is the latency a user serving one image sees.
  Everything is called twice first, which compiles and warms it.
  """
  if rounds < 1 or not candidates:
    raise ValueError('interleaved timing needs candidates and rounds >= 1.')
  calls = {}
  for name, c in candidates.items():
    jax.block_until_ready(c.call())
    start = _clock()
    jax.block_until_ready(c.call())
    calls[name] = max(1, int(seconds / max(_clock() - start, 1e-6)))
  order = list(candidates)
  times = {name: [] for name in order}
  for r in range(rounds):
    for name in (order if r % 2 == 0 else reversed(order)):
      call = candidates[name].call
      start = _clock()
      for _ in range(calls[name]):
        jax.block_until_ready(call())
      times[name].append((_clock() - start) / calls[name])
  return Timings(
      {n: np.asarray(t) for n, t in times.items()},
      {n: c.items for n, c in candidates.items()},
  )
