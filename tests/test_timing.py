"""The interleaved timer: ratios of known costs, turn-taking, spreads."""

import time

import numpy as np
import pytest

from vitjax import timing


def _sleeper(seconds, log=None, name=None):
  def call():
    if log is not None:
      log.append(name)
    time.sleep(seconds)

  return call


def test_the_ratio_of_two_known_costs():
  # Sleeping holds the thread whatever else the machine runs, so the costs
  # are known: A serves 2 images in 4 ms, B one in 3 ms (1.5x slower).
  t = timing.interleaved(
      {
          'a': timing.Candidate(_sleeper(0.004), 2),
          'b': timing.Candidate(_sleeper(0.003), 1),
      },
      rounds=5,
      seconds=0.03,
  )
  ratio = t.ratio('a', 'b')
  assert ratio.q25 <= ratio.median <= ratio.q75
  assert ratio.median == pytest.approx(1.5, rel=0.15)
  assert t.rate('a').median == pytest.approx(500, rel=0.15)
  assert t.latency_ms('b').median == pytest.approx(3.0, rel=0.15)
  assert len(t.seconds_per_call['a']) == 5


def test_candidates_take_turns_in_alternating_order():
  log = []
  timing.interleaved(
      {n: timing.Candidate(_sleeper(0.001, log, n), 1) for n in 'abc'},
      rounds=3,
      seconds=0.0,  # one call per candidate per round
  )
  # Two warm-up calls each, then a b c / c b a / a b c.
  assert log[6:] == list('abccbaabc')


def test_spread_format_and_errors():
  s = timing.Spread.of([1.0, 2.0, 3.0, 4.0, 5.0])
  assert (s.q25, s.median, s.q75) == (2.0, 3.0, 4.0)
  assert s.format('x') == '3.00x (IQR 2.00-4.00)'
  assert timing.Spread(**s.as_dict()) == s
  with pytest.raises(ValueError, match='rounds'):
    timing.interleaved({'a': timing.Candidate(lambda: None, 1)}, rounds=0)
  np.testing.assert_array_equal(
      timing.Timings({'a': np.array([0.5])}, {'a': 2}).rates('a'), [4.0]
  )
