"""Training end to end on a tiny dataset: outputs, resume, errors, devices."""

import copy
import dataclasses
import json
import os
import signal

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import avit as avit_config
from vitjax import checkpoint, errors, evaluate, families, main, models
from vitjax import train, trainer, workdir as workdir_lib
from vitjax.data import pipelines, sources

from tests.conftest import smoke_trainer


def _run(config, workdir):
  return train.train_and_evaluate(config, str(workdir))


def _latest_params(config, workdir):
  model = models.create(config.model, 10)
  abstract = trainer.abstract_params(model)
  with checkpoint.Checkpoints(workdir) as ckpts:
    params, step = ckpts.restore_weights(abstract, 'latest')
    return params, ckpts.read_meta(step)


def test_a_run_writes_checkpoints_metrics_and_report(trained_vit):
  run = trained_vit.workdir
  # What the end of training evaluates (the shared run left it out).
  report = evaluate.evaluate_checkpoint(trained_vit.config, run, 'best')
  assert (run / 'config.json').exists() and (run / 'run.json').exists()
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
      'attention.png',  # the class token's attention rollout
  ):
    assert (run / 'eval' / name).exists(), name
  assert list(run.glob('events.out.tfevents.*'))
  test = report['test']
  assert test['num_images'] == 80
  assert np.isclose(
      test['balanced_accuracy'], np.mean(test['per_class_recall'])
  )
  assert report['cost']['parameters'] == 21_162
  assert report['machine']['cpu'] and 'cpu_features' in report['machine']
  # The synthetic classes are easy: two epochs must beat chance clearly.
  assert test['balanced_accuracy'] > 0.3


def _at_step(monkeypatch, step, action):
  """Calls action() once, when the next run's pipeline reaches `step`."""
  make_pipeline = pipelines.make

  def hooked_pipeline(*args, **kwargs):
    pipeline = make_pipeline(*args, **kwargs)
    batches = pipeline.batches

    def hooked(start, end):
      for i, b in enumerate(batches(start, end)):
        if start + i == step:
          monkeypatch.setattr(pipelines, 'make', make_pipeline)
          action()
        yield b

    pipeline.batches = hooked
    return pipeline

  monkeypatch.setattr(pipelines, 'make', hooked_pipeline)


def _crash_at(monkeypatch, step):
  """Makes the next run's pipeline raise when it reaches `step`."""

  def crash():
    raise RuntimeError('simulated kill')

  _at_step(monkeypatch, step, crash)


def _records(workdir):
  """metrics.jsonl without its timing, which differs from run to run."""
  records = [
      json.loads(l)
      for l in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  for r in records:
    r.pop('images_per_second', None)
  return records


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(
    trained_vit, tmp_path, monkeypatch
):
  config = copy.deepcopy(trained_vit.config)
  config.train.final_evaluation = False  # the same weights, the same figures
  _crash_at(monkeypatch, 22)  # past the step-16 checkpoint, before the end
  with pytest.raises(RuntimeError, match='simulated kill'):
    _run(config, tmp_path / 'resumed')
  # What the kill left: latest and best agree with the validation log.
  with checkpoint.Checkpoints(tmp_path / 'resumed') as ckpts:
    assert ckpts.latest_step() == ckpts.best_step() == 16
    val = [r for r in _records(tmp_path / 'resumed') if r['split'] == 'val']
    assert ckpts.best_score() == max(r['balanced_accuracy'] for r in val)
  _run(config, tmp_path / 'resumed')
  # The same as the run that was never stopped: every parameter, the best
  # checkpoint and every record, training windows included (timing aside).
  full = trained_vit.workdir
  p_full, meta_full = _latest_params(config, full)
  p_res, meta_res = _latest_params(config, tmp_path / 'resumed')
  assert meta_full['step'] == meta_res['step'] == meta_full['total_steps']
  jax.tree.map(np.testing.assert_array_equal, p_full, p_res)
  with (
      checkpoint.Checkpoints(full) as a,
      checkpoint.Checkpoints(tmp_path / 'resumed') as b,
  ):
    assert (a.best_step(), a.best_score()) == (b.best_step(), b.best_score())
  assert _records(full) == _records(tmp_path / 'resumed')
  assert {r['split'] for r in _records(full)} == {'train', 'val'}


@pytest.mark.slow
def test_a_run_continues_from_another_with_a_changed_config(
    smoke_config, tmp_path, monkeypatch
):
  smoke_config.train.final_evaluation = False
  _crash_at(monkeypatch, 22)
  with pytest.raises(RuntimeError, match='simulated kill'):
    _run(smoke_config, tmp_path / 'first')
  smoke_config.optim.lr = 3e-5  # refused in the same workdir
  with pytest.raises(ValueError, match='optim.lr was'):
    _run(smoke_config, tmp_path / 'first')
  smoke_config.train.resume_from = str(tmp_path / 'first')
  _run(smoke_config, tmp_path / 'second')
  records = _records(tmp_path / 'second')
  # The first run's curves up to its checkpoint, then the second's.
  first = [r for r in _records(tmp_path / 'first') if r['step'] <= 16]
  assert first and [r for r in records if r['step'] <= 16] == first
  train = [r for r in records if r['split'] == 'train' and r['step'] > 16]
  assert train[0]['step'] == 20 and train[-1]['step'] == 31
  # From step 16 on, under the new learning rate.
  schedule = trainer.learning_rate_schedule(smoke_config.optim, 31, 16, 16)
  np.testing.assert_allclose(train[0]['learning_rate'], schedule(19), rtol=1e-6)
  with checkpoint.Checkpoints(tmp_path / 'second') as ckpts:
    assert ckpts.latest_step() == 31


@pytest.mark.slow
def test_eval_mode_restores_best_latest_or_a_step(trained_vit):
  config, run = trained_vit.config, trained_vit.workdir
  evaluate_ = lambda which: evaluate.evaluate_checkpoint(
      config, run, which, timed=False  # the figures, not their speed
  )
  best, latest = evaluate_('best'), evaluate_('latest')
  # Rerunning a finished run trains nothing more.
  steps = checkpoint.saved_steps(run)
  assert _run(config, run)['step'] == latest['step'] == max(steps)
  assert checkpoint.saved_steps(run) == steps
  by_step = evaluate_(latest['step'])
  assert by_step['test'] == latest['test']
  assert best['step'] <= latest['step']
  with pytest.raises(
      checkpoint.CheckpointError, match='no checkpoint at step 7'
  ):
    evaluate.evaluate_checkpoint(config, run, 7)


def test_a_workdir_that_cannot_be_made_is_one_line(
    smoke_config, tmp_path, capsys
):
  (tmp_path / 'file').write_text('not a folder')
  workdir = tmp_path / 'file' / 'run'
  assert main.run(smoke_config, str(workdir), 'train') == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and 'check the --workdir path' in lines[0], lines


def test_eval_mode_waits_for_no_live_run(trained_vit, capsys):
  # A live run's final evaluation writes the reports and the int8 save
  # that --mode=eval would write.
  with workdir_lib.WorkdirLock(trained_vit.workdir):
    assert main.run(trained_vit.config, str(trained_vit.workdir), 'eval') == 2
  assert 'is in use by a live run' in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_is_named(trained_vit, tmp_path):
  config = copy.deepcopy(trained_vit.config)
  config.model.hidden_dim = 48
  with pytest.raises(
      checkpoint.CheckpointError,
      match='does not fit the model: params/blocks_0/',
  ):
    evaluate.evaluate_checkpoint(config, trained_vit.workdir, 'best')
  with pytest.raises(checkpoint.CheckpointError, match='Train first'):
    evaluate.evaluate_checkpoint(config, tmp_path / 'empty', 'best')


def test_a_rerun_with_another_config_is_refused(trained_vit):
  config = copy.deepcopy(trained_vit.config)
  config.optim.lr = 0.1
  with pytest.raises(ValueError, match='optim.lr was 6.25e-05, now 0.1'):
    _run(config, trained_vit.workdir)


@pytest.mark.slow
def test_divergence_stops_with_the_steps_and_saves_no_nan_state(
    smoke_config, tmp_path
):
  smoke_config.optim.lr = 1e6
  with pytest.raises(
      FloatingPointError,
      match=r'steps \d+-\d+\. No checkpoint .*optim.lr, now 1e\+06',
  ):
    _run(smoke_config, tmp_path / 'run')
  steps = tmp_path / 'run' / 'steps'
  assert not steps.exists() or not any(steps.iterdir())


@pytest.mark.slow
def test_a_late_divergence_says_how_to_continue_from_the_last_checkpoint(
    smoke_config, tmp_path, monkeypatch
):
  build = families.build

  def diverging_after_step_18(*args, **kwargs):
    family = build(*args, **kwargs)
    objective = family.objective

    # A run of fixed length: the schedule position is the step.
    def nan_later(params, images, targets, position, rngs):
      loss, aux = objective(params, images, targets, position, rngs)
      return jnp.where(position >= 18, jnp.nan, loss), aux

    nan_later.extra_metrics = objective.extra_metrics
    return dataclasses.replace(family, objective=nan_later)

  monkeypatch.setattr(families, 'build', diverging_after_step_18)
  with pytest.raises(errors.DivergedError) as err:
    _run(smoke_config, tmp_path / 'run')
  message = str(err.value)
  assert 'steps 17-20' in message and 'checkpoint, step 16,' in message
  assert f"--config.train.resume_from='{tmp_path / 'run'}'" in message
  with checkpoint.Checkpoints(tmp_path / 'run') as ckpts:
    assert ckpts.latest_step() == 16  # no NaN state was saved


def test_deferred_reweighting_follows_the_schedule_position(smoke_config):
  # Under a time budget the position runs ahead of (or behind) the step
  # count: class weights switch on where the learning rate is.
  smoke_config.loss.class_weights = 'inverse'
  smoke_config.loss.reweight_from_epoch = 1.0  # position 10 below
  train_, batch = smoke_trainer(smoke_config, jax.devices()[:1])
  rates = train_.rates_along(100)(5.0)

  def fresh_state():  # with a head that tells the images' losses apart
    state = train_.init(jax.random.key(0))
    params = jax.tree.map(lambda x: x, state.params)
    kernel = params['head']['kernel']
    params['head']['kernel'] = jax.random.normal(
        jax.random.key(2), kernel.shape
    )
    return state.replace(params=params)

  loss = {}
  for position in (0.0, 9.5, 10.0):
    # Step 0 of the same state each time: only the position differs.
    _, metrics = train_.step(
        fresh_state(),
        batch,
        train_.metrics.empty(),
        rates,
        position,
    )
    loss[position] = float(metrics.compute()['loss'])
  assert loss[9.5] == loss[0.0]
  assert abs(loss[10.0] - loss[0.0]) > 0.01


@pytest.mark.slow
def test_two_devices_give_the_same_loss_as_one(smoke_config):
  assert jax.device_count() == 2
  losses = []
  for devices in (jax.devices()[:1], jax.devices()):
    train_, batch = smoke_trainer(smoke_config, devices)
    state, metrics = train_.init(jax.random.key(0)), train_.metrics.empty()
    rates = train_.rates_along(100)(50.0)
    for _ in range(2):
      state, metrics = train_.step(
          state,
          batch,
          metrics,
          rates,
          50.0,
      )
    losses.append(float(metrics.compute()['loss']))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.slow
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
  assert (tmp_path / 'checkpoints/run/eval/report_best.json').exists()


@pytest.mark.parametrize(
    'override, message',
    [
        ('--config.model.depht=3', 'depht'),
        ('--config.model.depth=three', 'depth'),
        ('--config.train.batch_size=1.5', 'batch_size'),
    ],
)
def test_the_command_line_names_a_bad_override(override, message, capsys):
  values = flags.FlagValues()
  main.define_flags(values)
  argv = ['vitjax', '--config=configs/vit.py:smoke', '--workdir=w', override]
  with pytest.raises(SystemExit) as stopped:
    main.parse_flags(argv, values)
  assert stopped.value.code == 2
  error = capsys.readouterr().err
  assert error.startswith('vitjax: ') and message in error
  assert len(error.strip().splitlines()) == 1


@pytest.mark.parametrize(
    'section, field, value, message',
    [
        ('data', 'val_fraction', 0.0, 'leaves no validation images'),
        ('eval', 'batch_size', 33, 'eval.batch_size=33 must be a multiple'),
    ],
)
def test_what_would_fail_later_is_refused_at_start(
    smoke_config, tmp_path, section, field, value, message
):
  smoke_config[section][field] = value
  with pytest.raises(errors.ConfigError, match=message):
    _run(smoke_config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()  # no step ran


def test_evaluating_on_another_split_is_refused(trained_vit):
  config = copy.deepcopy(trained_vit.config)
  config.seed = 1
  with pytest.raises(sources.DataError, match='seed was 0, now 1'):
    evaluate.evaluate_checkpoint(config, trained_vit.workdir, 'best')


def test_a_user_mistake_exits_2_with_its_message_alone(
    smoke_config, tmp_path, capsys
):
  c = avit_config.get_config('smoke')
  c.data, c.sparse.init_from = smoke_config.data, str(tmp_path / 'no_vit')
  assert main.run(c, str(tmp_path / 'avit'), 'train') == 2
  error = capsys.readouterr().err
  assert error.startswith('vitjax: ') and 'Train the ViT first' in error
  assert 'Traceback' not in error


@pytest.mark.slow
def test_a_signal_before_the_first_step_stops_after_it_saved(
    smoke_config, tmp_path, monkeypatch
):
  smoke_config.train.final_evaluation = False
  make_pipeline = pipelines.make

  def pipeline_then_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # while the run is still starting
    return make_pipeline(*args, **kwargs)

  monkeypatch.setattr(pipelines, 'make', pipeline_then_sigterm)
  with pytest.raises(errors.Stopped, match='stopped by SIGTERM at step 1'):
    _run(smoke_config, tmp_path / 'run')
  with checkpoint.Checkpoints(tmp_path / 'run') as ckpts:
    assert ckpts.latest_step() == 1


@pytest.mark.slow
def test_sigterm_saves_the_step_and_a_rerun_resumes(
    smoke_config, tmp_path, monkeypatch, capsys, caplog
):
  workdir = str(tmp_path / 'run')
  smoke_config.train.eval_every_epochs = 2.0  # of 2: the last step alone
  smoke_config.train.final_evaluation = False
  # SIGTERM to this process between two log steps, as a scheduler sends it.
  _at_step(monkeypatch, 12, lambda: os.kill(os.getpid(), signal.SIGTERM))
  assert main.run(smoke_config, workdir, 'train') == 128 + signal.SIGTERM
  stderr = capsys.readouterr().err
  assert 'stopped by SIGTERM at step' in stderr and 'Traceback' not in stderr
  with checkpoint.Checkpoints(workdir) as ckpts:
    stopped_at = ckpts.latest_step()
    assert ckpts.best_step() is None  # saved, not validated
  assert 12 <= stopped_at < 31
  assert f'at step {stopped_at}, which is saved' in stderr
  assert _records(tmp_path / 'run')[-1]['step'] == stopped_at
  with caplog.at_level('INFO'):
    assert main.run(smoke_config, workdir, 'train') == 0
  assert f'Resuming from step {stopped_at} of 31' in caplog.text
  with checkpoint.Checkpoints(workdir) as ckpts:
    assert ckpts.latest_step() == 31
