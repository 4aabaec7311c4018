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
