"""One orbax manager keeps the latest steps and the best validated one."""

import jax
import numpy as np
import pytest

from vitjax import checkpoint


def _save(ckpts, step, score):
  state = {'w': np.full(3, step, np.float32)}
  ckpts.save(
      state, {'step': step, 'total_steps': 100, 'train_seconds': 1.0}, score
  )


def test_latest_steps_and_the_best_validated_one_are_kept(tmp_path):
  with checkpoint.Checkpoints(tmp_path, keep=2) as ckpts:
    for step, score in (
        (10, 0.5),
        (20, 0.7),
        (30, 0.6),
        (40, 0.7),
        (45, None),
        (50, 0.65),
    ):
      _save(ckpts, step, score)
    ckpts.wait()
    # 20 and 40 tie: a new best must be strictly better, so 20 stays best.
    assert ckpts.best_step() == 20 and ckpts.best_score() == 0.7
    assert ckpts.latest_step() == 50
    assert sorted(p.name for p in (tmp_path / 'steps').iterdir()) == [
        '20',
        '45',
        '50',
    ]
    abstract = {'w': jax.ShapeDtypeStruct((3,), np.float32)}
    state, meta = ckpts.restore(abstract, 'best')
    np.testing.assert_array_equal(state['w'], 20)
    assert meta['step'] == 20
    assert ckpts.read_meta(45)['total_steps'] == 100


def test_unvalidated_steps_are_never_the_best(tmp_path):
  with checkpoint.Checkpoints(tmp_path) as ckpts:
    _save(ckpts, 5, None)
    ckpts.wait()
    assert ckpts.best_step() is None and ckpts.best_score() == -np.inf
    with pytest.raises(
        checkpoint.CheckpointError, match='no validated checkpoint'
    ):
      ckpts.restore({'w': jax.ShapeDtypeStruct((3,), np.float32)}, 'best')
