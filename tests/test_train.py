"""Training end to end on a tiny dataset: outputs, resume, errors, devices."""

import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from vitjax import checkpoint, evaluate, models, objectives
from vitjax import losses as losses_lib, optimizers, sharding, train
from vitjax import train_state, workdir
from vitjax.data import pipelines, sources


def _run(config, workdir):
  return train.train_and_evaluate(config, str(workdir))


def _latest_params(config, workdir):
  data = sources.load(config.data, config.seed)
  model = models.create(config.model, data.num_classes)
  tx = optimizers.make_optimizer(config.optim, optax.constant_schedule(0.0))
  abstract = train_state.abstract(
      model, tx, False, sharding.replicated(sharding.make_mesh())
  )
  with checkpoint.Checkpoints(workdir) as ckpts:
    state, meta = ckpts.restore(abstract, 'latest')
  return state.params, meta


def test_a_run_writes_checkpoints_metrics_and_report(smoke_config, tmp_path):
  report = _run(smoke_config, tmp_path / 'run')
  run = tmp_path / 'run'
  assert (run / 'config.json').exists()
  assert sorted(int(p.name) for p in (run / 'steps').iterdir()) == [16, 31]
  records = [
      json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()
  ]
  assert {r['split'] for r in records} == {'train', 'val'}
  assert all(np.isfinite(r['loss']) for r in records)
  for name in (
      'report_best.json',
      'curves.png',
      'confusion_test.png',
      'recall_test.png',
  ):
    assert (run / 'eval' / name).exists(), name
  assert list(run.glob('events.out.tfevents.*'))
  test = report['test']
  assert test['num_images'] == 80
  assert np.isclose(
      test['balanced_accuracy'], np.mean(test['per_class_recall'])
  )
  assert report['cost']['parameters'] == 21_162
  # The synthetic classes are easy: two epochs must beat chance clearly.
  assert test['balanced_accuracy'] > 0.3


def test_killed_run_resumes_to_the_same_numbers(
    smoke_config, tmp_path, monkeypatch
):
  full = _run(smoke_config, tmp_path / 'full')

  make_pipeline = pipelines.make

  def crashing_pipeline(*args, **kwargs):
    pipeline = make_pipeline(*args, **kwargs)
    batches = pipeline.batches

    def batches_then_crash(start, end):
      for i, b in enumerate(batches(start, end)):
        if start + i == 22:  # past the step-16 checkpoint, before the end
          raise RuntimeError('simulated kill')
        yield b

    pipeline.batches = batches_then_crash
    return pipeline

  monkeypatch.setattr(pipelines, 'make', crashing_pipeline)
  with pytest.raises(RuntimeError, match='simulated kill'):
    _run(smoke_config, tmp_path / 'resumed')
  monkeypatch.setattr(pipelines, 'make', make_pipeline)
  resumed = _run(smoke_config, tmp_path / 'resumed')

  p_full, meta_full = _latest_params(smoke_config, tmp_path / 'full')
  p_res, meta_res = _latest_params(smoke_config, tmp_path / 'resumed')
  assert meta_full['step'] == meta_res['step'] == meta_full['total_steps']
  jax.tree.map(np.testing.assert_array_equal, p_full, p_res)
  for split in ('val', 'test'):
    assert full[split]['confusion_matrix'] == resumed[split]['confusion_matrix']
    assert full[split]['loss'] == resumed[split]['loss']
  train_log = lambda d: [
      l
      for l in (d / 'metrics.jsonl').read_text().splitlines()
      if 'images_per_second' not in l
  ]
  assert train_log(tmp_path / 'full') == train_log(tmp_path / 'resumed')


def test_eval_mode_restores_best_latest_or_a_step(smoke_config, tmp_path):
  _run(smoke_config, tmp_path / 'run')
  best = evaluate.evaluate_checkpoint(smoke_config, tmp_path / 'run', 'best')
  latest = evaluate.evaluate_checkpoint(
      smoke_config, tmp_path / 'run', 'latest'
  )
  by_step = evaluate.evaluate_checkpoint(
      smoke_config, tmp_path / 'run', latest['step']
  )
  assert by_step['test'] == latest['test']
  assert best['step'] <= latest['step']
  with pytest.raises(
      checkpoint.CheckpointError, match='no checkpoint at step 7'
  ):
    evaluate.evaluate_checkpoint(smoke_config, tmp_path / 'run', 7)


def test_a_checkpoint_that_does_not_fit_is_named(smoke_config, tmp_path):
  _run(smoke_config, tmp_path / 'run')
  smoke_config.model.hidden_dim = 48
  with pytest.raises(
      checkpoint.CheckpointError,
      match='does not fit the model: params/blocks_0/',
  ):
    evaluate.evaluate_checkpoint(smoke_config, tmp_path / 'run', 'best')
  with pytest.raises(checkpoint.CheckpointError, match='Train first'):
    evaluate.evaluate_checkpoint(smoke_config, tmp_path / 'empty', 'best')


def test_a_rerun_with_another_config_is_refused(smoke_config, tmp_path):
  smoke_config.train.epochs = 0.2
  _run(smoke_config, tmp_path / 'run')
  smoke_config.optim.lr = 0.1
  with pytest.raises(ValueError, match='optim.lr was 6.25e-05, now 0.1'):
    _run(smoke_config, tmp_path / 'run')


def test_a_live_workdir_is_locked(tmp_path):
  lock = workdir.WorkdirLock(tmp_path)
  with pytest.raises(RuntimeError, match='in use by a live run'):
    workdir.WorkdirLock(tmp_path)
  lock.release()
  workdir.WorkdirLock(tmp_path).release()


def test_divergence_stops_with_the_steps_and_saves_no_nan_state(
    smoke_config, tmp_path
):
  smoke_config.optim.lr = 1e6
  with pytest.raises(FloatingPointError, match=r'steps \d+-\d+.*checkpoint'):
    _run(smoke_config, tmp_path / 'run')
  steps = tmp_path / 'run' / 'steps'
  assert not steps.exists() or not any(steps.iterdir())


def test_two_devices_give_the_same_loss_as_one(smoke_config):
  assert jax.device_count() == 2
  data = sources.load(smoke_config.data, 0)
  model = models.create(smoke_config.model, data.num_classes)
  batch = {'image': data.train.images[:16], 'label': data.train.labels[:16]}
  losses = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    schedule = optax.constant_schedule(1e-3)
    tx = optimizers.make_optimizer(smoke_config.optim, schedule)
    state = jax.jit(
        lambda key: train_state.create(
            model, train_state.init_params(model, key), tx, False
        ),
        out_shardings=sharding.replicated(mesh),
    )(jax.random.key(0))
    objective = objectives.Classification(
        model,
        losses_lib.make_classification_loss(
            smoke_config.loss, data.train.counts(10), 10
        ),
    )
    step = train.make_train_step(
        objective, schedule, smoke_config, 10, jax.random.key(1), mesh
    )
    metrics = train.make_metrics_cls(()).empty()
    for _ in range(2):
      state, metrics = step(
          state,
          sharding.host_batch_to_global(batch, sharding.batch_sharding(mesh)),
          metrics,
      )
    losses.append(float(metrics.compute()['loss']))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_device_pipeline_trains_too_in_a_relative_workdir(
    smoke_config, tmp_path, monkeypatch
):
  smoke_config.data.pipeline = 'device'
  smoke_config.train.epochs = 0.5
  # The README's commands name workdirs relative to the checkout.
  monkeypatch.chdir(tmp_path)
  report = _run(smoke_config, 'checkpoints/run')
  assert np.isfinite(report['val']['loss'])
  assert any((tmp_path / 'checkpoints/run/steps').iterdir())


def test_time_budget_sizes_the_schedule(smoke_config, tmp_path):
  smoke_config.train.time_budget_minutes = 0.5
  _run(smoke_config, tmp_path / 'run')
  _, meta = _latest_params(smoke_config, tmp_path / 'run')
  assert meta['step'] == meta['total_steps'] > 10
  assert meta['train_seconds'] < 30


@pytest.mark.parametrize(
    'override, message',
    [
        ('--config.model.depht=3', 'depht'),
        ('--config.model.depth=three', 'depth'),
        ('--config.train.batch_size=1.5', 'batch_size'),
    ],
)
def test_the_command_line_names_a_bad_override(override, message, tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'vitjax.main',
          '--config=configs/vit.py:smoke',
          f'--workdir={tmp_path}',
          override,
      ],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not (tmp_path / 'config.json').exists()  # nothing was started
