"""The config files: every preset loads and says what it runs."""

import pytest

from configs import avit, common, dynamic_vit, vit

PRESETS = [(m, p) for m in (vit, avit, dynamic_vit) for p in m.PRESETS]


@pytest.mark.parametrize('module, preset', PRESETS)
def test_every_preset_states_its_learning_rate_at_the_batch_it_runs(
    module, preset
):
  c = module.get_config(preset)
  assert c.optim.lr_base_batch == c.train.batch_size


def test_the_default_sizes_are_a_named_variant():
  c = common.base()
  sizes = (
      c.model.patch_size,
      c.model.hidden_dim,
      c.model.depth,
      c.model.num_heads,
      c.model.mlp_ratio,
  )
  assert sizes == common.VARIANTS['small/4']


def test_an_unknown_preset_is_named():
  with pytest.raises(ValueError, match="'gpu'.*expected one of"):
    vit.get_config('gpu')


def test_the_dense_control_preset_is_the_cpu_preset_without_dropping():
  control = dynamic_vit.get_config('cpu_dense').to_dict()
  sparse = dynamic_vit.get_config('cpu').to_dict()
  assert control['model'].pop('name') == 'vit'
  assert sparse['model'].pop('name') == 'dynamic_vit'
  for field in ('keep_ratio', 'stage_blocks', 'gumbel_tau'):
    del sparse['model'][field]
  assert control == sparse


@pytest.mark.parametrize(
    'module, preset', [(m, p) for m in (avit, dynamic_vit) for p in m.PRESETS]
)
def test_fine_tunes_keep_every_token_whatever_the_vit_trained_with(
    module, preset
):
  assert module.get_config(preset).model.patch_dropout == 0.0
