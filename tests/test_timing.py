"""The interleaved timer: ratios of known costs, turn-taking, spreads."""

import numpy as np
import pytest

from vitjax.measure import timing


class _FakeMachine:
  """A clock that calls advance by their cost, twice over while the machine
  is busy (from `busy_from` to `busy_until` on that clock)."""

  def __init__(self, busy_from: float, busy_until: float):
    self.now, self.busy = 0.0, (busy_from, busy_until)

  def clock(self) -> float:
    return self.now

  def work(self, seconds: float):
    def call():
      slow = 2.0 if self.busy[0] <= self.now < self.busy[1] else 1.0
      self.now += seconds * slow

    return call


def test_the_ratio_of_two_known_costs_survives_a_busy_machine(monkeypatch):
  # A serves 2 images in 4 ms, B one in 3 ms: A is 1.5x as fast. The
  # machine runs at half speed for a stretch of the timing.
  machine = _FakeMachine(busy_from=0.05, busy_until=0.12)
  monkeypatch.setattr(timing, '_clock', machine.clock)
  candidates = {
      'a': timing.Candidate(machine.work(0.004), 2),
      'b': timing.Candidate(machine.work(0.003), 1),
  }
  t = timing.interleaved(candidates, rounds=9, seconds=0.012)
  assert len(t.seconds_per_call['a']) == 9
  assert t.ratio('a', 'b').median == pytest.approx(1.5)
  assert t.rate('a').median == pytest.approx(500)
  assert t.ms_per_item('b').median == pytest.approx(3.0)
  assert t.ms_per_item('a').median == pytest.approx(2.0)
  # The busy stretch did slow some rounds down; the ratio's median holds.
  assert t.rates('a').min() == pytest.approx(250)
  assert (t.rates('a') / t.rates('b')).min() < 1.5


def test_candidates_take_turns_in_alternating_order():
  log = []
  timing.interleaved(
      {n: timing.Candidate(lambda n=n: log.append(n), 1) for n in 'abc'},
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


def test_speed_report_gives_each_model_its_own_baseline_too(monkeypatch):
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  from configs import common
  from vitjax import models, parallel
  from vitjax.evaluators import speed
  from vitjax.evaluators.classification import Predictor

  machine = _FakeMachine(busy_from=-1.0, busy_until=-1.0)
  monkeypatch.setattr(timing, '_clock', machine.clock)
  c = common.base()
  common.apply_variant(c, 'nano/4')
  c.model.stem = 'patch'
  model = models.create(c.model, 10)
  params = model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False
  )['params']
  costs = {'a': 3.0, 'b': 2.0, 'c': 1.0}  # seconds per call on the fake clock
  predictors = {name: Predictor(model, {'params': params}) for name in costs}

  def serving_fn(predictor, mesh, batch):
    del mesh, batch
    (name,) = [n for n, p in predictors.items() if p is predictor]
    return lambda variables, images: (machine.work(costs[name])(), images)[1]

  # Each call is charged its model's cost on the fake clock.
  monkeypatch.setattr(speed, '_serving_fn', serving_fn)
  report = speed.speed_report(
      predictors,
      parallel.make_mesh(),
      np.zeros((8, 32, 32, 3), np.uint8),
      4,
      rounds=3,
      seconds=0.0,
      baseline='a',
      more_baselines={'own': {'c': 'b'}, 'first': {'b': 'a', 'c': 'a'}},
  )
  assert report['b']['speedup']['batch 4']['median'] == pytest.approx(1.5)
  assert report['c']['speedup']['batch 1']['median'] == pytest.approx(3.0)
  own = report['c']['speedup_over_own']
  assert own['over'] == 'b'
  assert own['batch 4']['median'] == pytest.approx(2.0)
  assert own['batch 1']['median'] == pytest.approx(2.0)
  assert report['b']['speedup_over_first']['batch 1']['median'] == (
      pytest.approx(1.5)
  )
  assert report['c']['speedup_over_first']['over'] == 'a'
  assert report['c']['speedup_over_first']['batch 4']['median'] == (
      pytest.approx(3.0)
  )
  assert 'speedup_over_own' not in report['a']
  assert 'speedup_over_own' not in report['b']
  assert 'speedup_over_first' not in report['a']


def test_speed_report_refuses_a_baseline_it_does_not_time():
  # pylint: disable=g-import-not-at-top
  from vitjax import parallel
  from vitjax.evaluators import speed

  with pytest.raises(ValueError, match=r"more_baselines\['own'\].*'d'"):
    speed.speed_report(
        {'a': None},
        parallel.make_mesh(),
        np.zeros((8, 32, 32, 3), np.uint8),
        4,
        rounds=1,
        seconds=0.0,
        more_baselines={'own': {'a': 'd'}},
    )
