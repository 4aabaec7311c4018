"""DynamicViT and A-ViT fine-tuned end to end from a (tiny) ViT workdir."""

import json

import jax
import numpy as np
import pytest

from configs import avit as avit_config, dynamic_vit as dvit_config
from vitjax import checkpoint, errors, evaluate, families, models, objectives
from vitjax import parallel, serving, train, trainer
from vitjax.data import sources


def _sparse_config(get_config, smoke_config, init_from):
  c = get_config('smoke')
  for section in ('data', 'train', 'eval'):
    c[section] = smoke_config[section]
  c.sparse.init_from = str(init_from)
  c.train.epochs = 1.0
  return c


@pytest.fixture
def vit_workdir(trained_vit_workdir):
  return trained_vit_workdir


@pytest.mark.slow
def test_dynamic_vit_starts_from_the_vit_and_reports_against_it(
    smoke_config, vit_workdir, tmp_path, capsys
):
  c = _sparse_config(dvit_config.get_config, smoke_config, vit_workdir)
  report = train.train_and_evaluate(c, str(tmp_path / 'dvit'))
  assert report['teacher']['step'] > 0
  assert report['sparsity']['keep_counts'] == [44]  # depth 2: one stage
  cost, t_cost = report['cost'], report['teacher']['cost']
  assert cost['predictor_macs_per_image'] > 0
  assert cost['macs_per_image'] < t_cost['macs_per_image']
  assert cost['parameters'] > t_cost['parameters']  # + the predictors
  # Timed together with its teacher: both batches, ratios with a spread.
  speed = report['speed']['model']
  assert speed['speedup_over'] == 'teacher'
  # Each side named with its precision (an int8 student's would differ).
  precision = report['precision']
  assert report['teacher']['precision'] == precision
  assert (
      f'speed-up of this {precision} model over the {precision} teacher, '
      'timed interleaved' in capsys.readouterr().out
  )
  for at in ('batch 16', 'batch 1'):
    r = speed['speedup'][at]
    assert 0 < r['q25'] <= r['median'] <= r['q75'], at
  assert report['speed']['teacher']['images_per_second']['median'] > 0
  records = [
      json.loads(l)
      for l in (tmp_path / 'dvit' / 'metrics.jsonl').read_text().splitlines()
  ]
  train_records = [r for r in records if r['split'] == 'train']
  for key in ('ratio_loss', 'kl_loss', 'token_loss', 'keep_0'):
    assert np.isfinite(train_records[-1][key]), key
  assert (tmp_path / 'dvit' / 'eval' / 'tokens.png').exists()


@pytest.mark.slow
def test_a_fine_tune_builds_on_an_untrained_teacher(smoke_config):
  # What scripts/benchmark.py times, without a ViT run (the script's test
  # times DynamicViT's step): A-ViT calibrates its gate on the teacher.
  c = _sparse_config(avit_config.get_config, smoke_config, 'no/vit/run')
  data = sources.load(c.data, c.seed)
  teacher = families.untrained_teacher(c, data.num_classes)
  family = families.build(c, data, 10, parallel.make_mesh(), None, teacher)
  assert family.teacher is teacher
  assert family.model.gate_center != c.model.gate_center


def test_the_predictors_train_at_the_full_rate_the_backbone_frozen_first():
  params = {
      'embed': {'kernel': 1.0},
      'cls': 1.0,
      'blocks_0': {'kernel': 1.0},
      'predictors_0': {'in_conv': {'kernel': 1.0}},
  }
  dense = {k: v for k, v in params.items() if k != 'predictors_0'}
  assert trainer.param_groups(params, dense, ('cls',)) == {
      'embed': {'kernel': 'backbone'},
      'cls': 'frozen',
      'blocks_0': {'kernel': 'backbone'},
      'predictors_0': {'in_conv': {'kernel': 'new'}},
  }
  c = dvit_config.get_config('smoke')
  c.optim.warmup_epochs = 0.0
  c.sparse.freeze_backbone_fraction = 0.5
  optimizer = trainer.finetune(
      c.optim,
      c.sparse,
      params,
      steps_per_epoch=10,
      batch_size=c.train.batch_size,
      dense=dense,
      frozen_names=('cls',),
  )
  params = jax.tree.map(lambda v: np.full((2, 2), v, np.float32), params)
  grads = jax.tree.map(np.ones_like, params)
  # Frozen for the first half of a 10-step schedule: at position 2.
  opt_state = optimizer.tx.init(params)
  rates = optimizer.schedules(10)(2.0)
  opt_state = opt_state._replace(hyperparams=opt_state.hyperparams | rates)
  updates, _ = optimizer.tx.update(grads, opt_state, params)
  assert np.all(updates['predictors_0']['in_conv']['kernel'] != 0)
  assert not np.any(updates['blocks_0']['kernel'])
  assert not np.any(updates['cls'])


def _family(config):
  data = sources.load(config.data, config.seed)
  return families.build(config, data, 10, parallel.make_mesh(), None)


def _logged(family, metrics):
  """Whether the train step logs each of `metrics` (the objective's extra
  metrics join every training record of metrics.jsonl)."""
  return {m: m in family.objective.extra_metrics for m in metrics}


@pytest.mark.slow
def test_dynamic_vit_without_a_teacher_is_the_ablation(
    smoke_config, vit_workdir
):
  c = _sparse_config(dvit_config.get_config, smoke_config, vit_workdir)
  c.sparse.distill = False
  family = _family(c)
  assert family.objective.teacher is None
  assert _logged(family, ('kl_loss', 'ratio_loss')) == {
      'kl_loss': False,
      'ratio_loss': True,
  }


@pytest.mark.slow
def test_avit_calibrates_its_gate_and_reports_depths(
    smoke_config, vit_workdir, tmp_path
):
  c = _sparse_config(avit_config.get_config, smoke_config, vit_workdir)
  # Fewer images than the first class has: a sample that took the first
  # ones would hold airplanes only (the arrays are sorted by class).
  c.sparse.calibration_images = 30
  # Two even batches of the 80 test images: token removal compiles per
  # shape.
  c.eval.batch_size = 40
  report = train.train_and_evaluate(c, str(tmp_path / 'avit'))
  calibration = json.loads((tmp_path / 'avit' / 'calibration.json').read_text())
  assert calibration['images'] == 30
  assert sorted(calibration['halting_sum_per_class']) == sorted(
      report['class_names']
  )
  sp = report['sparsity']
  assert sp['gate_center'] == calibration['gate_center']
  # Mean depth: the tokens each block ran, over the tokens of an image.
  np.testing.assert_allclose(
      sp['mean_depth_per_token'], sum(sp['tokens_per_block']) / 65, rtol=1e-6
  )
  halts = np.asarray(sp['halting_distribution'])
  np.testing.assert_allclose(halts.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      (np.arange(1, 3) * halts).sum(), sp['mean_depth_per_token'], rtol=1e-6
  )
  assert sp['token_removal_agreement'] == 1.0
  speed = report['speed']['model']
  assert speed['masked_images_per_second']['median'] > 0
  assert speed['token_removal_over_masked']['median'] > 0
  assert speed['path'].startswith('token removal')
  assert len(sp['tokens_per_block']) == 2
  assert (tmp_path / 'avit' / 'eval' / 'halting.png').exists()
  assert (tmp_path / 'avit' / 'eval' / 'depth.png').exists()
  depth_per_class = np.asarray(sp['mean_depth_per_class'])
  assert depth_per_class.shape == (10,)
  assert (1 <= depth_per_class).all() and (depth_per_class <= 2).all()
  # Evaluation alone, and serving, reuse the stored calibration: the
  # model that evaluation restores, gate included, serves.
  restored = evaluate.restore_predictors(
      c,
      tmp_path / 'avit',
      'best',
      data=sources.load(c.data, c.seed),
      mesh=parallel.make_mesh(),
  )
  assert restored.predictor.model.gate_center == calibration['gate_center']
  # 20 images: the masked path, which evaluation compiled already.
  images = sources.load(c.data, c.seed).test.images[:20]
  np.testing.assert_allclose(
      serving.load(tmp_path / 'avit').probabilities(images),
      jax.nn.softmax(
          restored.predictor.logits(restored.predictor.variables, images)
      ),
      rtol=1e-5,
      atol=1e-6,
  )


def test_a_missing_vit_workdir_says_how_to_make_it(smoke_config, tmp_path):
  c = _sparse_config(dvit_config.get_config, smoke_config, tmp_path / 'nowhere')
  with pytest.raises(
      checkpoint.CheckpointError,
      match='Train the ViT first: python -m vitjax.main',
  ):
    train.train_and_evaluate(c, str(tmp_path / 'dvit'))


def test_a_backbone_of_other_sizes_is_refused(
    smoke_config, vit_workdir, tmp_path
):
  c = _sparse_config(avit_config.get_config, smoke_config, vit_workdir)
  c.model.hidden_dim = 64
  with pytest.raises(
      checkpoint.CheckpointError, match='model.hidden_dim is 64 here but 32'
  ):
    train.train_and_evaluate(c, str(tmp_path / 'avit'))


def test_the_dense_control_is_dynamic_vit_training_without_dropping(
    smoke_config, vit_workdir, tmp_path
):
  c = _sparse_config(dvit_config.get_config, smoke_config, vit_workdir)
  c.model.name = 'vit'  # as configs/dynamic_vit.py:cpu_dense
  for field in ('keep_ratio', 'stage_blocks', 'gumbel_tau'):
    del c.model[field]
  family = _family(c)
  # DynamicViT's objective and optimizer, distilled from the teacher,
  # without stages, so without its ratio loss.
  assert type(family.model) is models.MODELS['vit']
  assert isinstance(family.objective, objectives.DynamicViTObjective)
  assert family.objective.teacher is family.teacher is not None
  assert _logged(family, ('kl_loss', 'token_loss', 'ratio_loss')) == {
      'kl_loss': True,
      'token_loss': True,
      'ratio_loss': False,
  }
  assert set(family.optimizer.schedules(10)(0.0)) == {
      'learning_rate',
      'backbone_learning_rate',
  }
  # It keeps every token: PatchDropout is refused.
  c.model.patch_dropout = 0.5
  with pytest.raises(errors.ConfigError, match='keeps every token'):
    train.train_and_evaluate(c, str(tmp_path / 'control_dropping'))


def test_a_teacher_trained_on_another_split_is_refused(
    smoke_config, vit_workdir, tmp_path
):
  c = _sparse_config(dvit_config.get_config, smoke_config, vit_workdir)
  c.data.val_fraction = 0.25  # the ViT held out 0.2
  with pytest.raises(sources.DataError, match='val_fraction was 0.2, now 0.25'):
    train.train_and_evaluate(c, str(tmp_path / 'dvit'))
