"""What a model family trains with: its optimizer, the train state and the
jitted train step. `build` puts them together for any family; the training
loop (train.py), the benchmark (scripts/benchmark.py) and the tests use it.

Optimizers: AdamW with gradient clipping, on every parameter (`adamw`) or
in a fine-tune's groups (`finetune`). `optim.lr` is the peak learning rate
at `optim.lr_base_batch` images per step; a run at another
`train.batch_size` scales it linearly (the configs state it at the batch
they run, so they run it unscaled).

The learning-rate schedules are functions of a position along them, not
of the update count: a time-budgeted run moves along its schedule at the
pace its clock allows (time_budget.py). The rates reach the optimizer
through optax.inject_hyperparams: the train step takes the rates at its
position as an input and sets them in the optimizer's state before the
update, so one compiled step serves every plan. A `Plan` says at which
position each step runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from clu import metrics
from flax.training import train_state
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
import optax

from vitjax import parallel
from vitjax.data import mixing
from vitjax.data.sources import IMAGE_SHAPE

# Parameters kept out of weight decay besides biases and norms: the learned
# tokens and position embeddings (as DeiT and timm do).
_NO_DECAY_NAMES = ('pos_embedding', 'cls')

Rates = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """tx: the optimizer, whose injected hyperparameters are its learning
  rates; schedules(horizon)(position): those rates at a position (a step,
  possibly fractional) of schedules `horizon` steps long."""

  tx: optax.GradientTransformation
  schedules: Callable[[int], Callable[[Any], Rates]]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Steps anchor_step .. end_step run at positions evenly spaced from
  anchor_position to `horizon`, the schedules' length."""

  horizon: int
  end_step: int
  anchor_step: int = 0
  anchor_position: float = 0.0

  @classmethod
  def fixed(cls, steps: int) -> Plan:
    """Step s at position s."""
    return cls(steps, steps)

  def position(self, step: int) -> float:
    """The schedule position of the update that step `step` + 1 makes
    (optax's convention: the first update is at position 0)."""
    if step >= self.end_step:  # exactly, whatever the rounding on the way
      return float(self.horizon)
    if step < self.anchor_step:
      raise ValueError(
          f'Step {step} ran under an earlier plan: this one starts at step '
          f'{self.anchor_step}.'
      )
    pace = (self.horizon - self.anchor_position) / (
        self.end_step - self.anchor_step
    )
    return self.anchor_position + (step - self.anchor_step) * pace

  def ending_at(self, step: int, end_step: int) -> Plan:
    """The same schedule, from where step `step` is, ending at end_step."""
    return Plan(self.horizon, end_step, step, self.position(step))


def learning_rate_schedule(
    optim_cfg, horizon: int, steps_per_epoch: int, batch_size: int
) -> optax.Schedule:
  """Linear warmup, then cosine decay to min_lr at position `horizon`."""
  peak = optim_cfg.lr * batch_size / optim_cfg.lr_base_batch
  warmup = min(
      int(round(optim_cfg.warmup_epochs * steps_per_epoch)),
      max(horizon - 1, 0),
  )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(horizon, warmup + 1),
      end_value=min(optim_cfg.min_lr, peak),
  )


def _decay_mask(params: Any) -> Any:
  def decays(path, leaf):
    name = getattr(path[-1], 'key', '')
    return leaf.ndim > 1 and name not in _NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params)


def _adamw(optim_cfg, learning_rate) -> optax.GradientTransformation:
  return optax.adamw(
      learning_rate,
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      weight_decay=optim_cfg.weight_decay,
      mask=_decay_mask,
  )


def _clipped(optim_cfg, tx) -> optax.GradientTransformation:
  """Clips the global gradient norm (over all parameters) before tx."""
  if optim_cfg.grad_clip_norm <= 0:
    return tx
  return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), tx)


def adamw(optim_cfg, steps_per_epoch: int, batch_size: int) -> Optimizer:
  """AdamW on every parameter, after gradient clipping."""

  def schedules(horizon):
    schedule = learning_rate_schedule(
        optim_cfg, horizon, steps_per_epoch, batch_size
    )
    return lambda position: {'learning_rate': schedule(position)}

  tx = optax.inject_hyperparams(
      lambda learning_rate: _clipped(
          optim_cfg, _adamw(optim_cfg, learning_rate)
      )
  )(learning_rate=0.0)
  return Optimizer(tx, schedules)


def param_groups(params: Any, dense: Any, frozen_names: tuple[str, ...]) -> Any:
  """'new' (absent from the dense ViT's params), 'frozen' or 'backbone' per
  leaf. Membership, not module names, decides what is new."""

  def label(path, _):
    node = dense
    for key in path:
      if not isinstance(node, dict) or key.key not in node:
        return 'new'
      node = node[key.key]
    return 'frozen' if path[-1].key in frozen_names else 'backbone'

  return jax.tree_util.tree_map_with_path(label, params)


def finetune(
    optim_cfg,
    sparse_cfg,
    params: Any,
    steps_per_epoch: int,
    batch_size: int,
    dense: Any,
    frozen_names: tuple[str, ...] = (),
) -> Optimizer:
  """Modules absent from `dense` (the ViT's params) at the full schedule
  (its `learning_rate`); the backbone at backbone_lr_mult of it
  (`backbone_learning_rate`), held at zero for the first
  freeze_backbone_fraction of the schedule; `frozen_names` never move."""
  mult = sparse_cfg.backbone_lr_mult
  labels = param_groups(params, dense, frozen_names)

  def schedules(horizon):
    schedule = learning_rate_schedule(
        optim_cfg, horizon, steps_per_epoch, batch_size
    )
    freeze = round(sparse_cfg.freeze_backbone_fraction * horizon)

    def rates(position):
      lr = schedule(position)
      backbone = jnp.where(position < freeze, 0.0, mult * lr)
      return {'learning_rate': lr, 'backbone_learning_rate': backbone}

    return rates

  def groups(learning_rate, backbone_learning_rate):
    return _clipped(
        optim_cfg,
        optax.multi_transform(
            {
                'new': _adamw(optim_cfg, learning_rate),
                'backbone': _adamw(optim_cfg, backbone_learning_rate),
                'frozen': optax.set_to_zero(),
            },
            labels,
        ),
    )

  tx = optax.inject_hyperparams(groups)(
      learning_rate=0.0, backbone_learning_rate=0.0
  )
  return Optimizer(tx, schedules)


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, tx, opt_state; apply_fn is the
  model's apply, though the objectives call the model themselves) and an
  EMA of the weights."""

  ema_params: Any  # an EMA of params, or None when optim.ema_decay == 0

  def with_rates(self, rates: Rates) -> 'TrainState':
    """The state whose next update applies these learning rates."""
    hyperparams = self.opt_state.hyperparams | rates
    return self.replace(
        opt_state=self.opt_state._replace(hyperparams=hyperparams)
    )

  def eval_params(self, use_ema: bool = True) -> Any:
    """The weights to evaluate: the EMA's when asked and kept."""
    if use_ema and self.ema_params is not None:
      return self.ema_params
    return self.params


def init_params(model: nn.Module, key: jax.Array) -> Any:
  dummy = jnp.zeros((1,) + IMAGE_SHAPE, jnp.uint8)
  return model.init({'params': key}, dummy, train=False)['params']


def abstract_params(model: nn.Module) -> Any:
  """The shapes and dtypes of the model's parameters (no computation)."""
  return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))


def create_state(
    model: nn.Module,
    params: Any,
    tx: optax.GradientTransformation,
    use_ema: bool,
) -> TrainState:
  # An int32 step (TrainState.create's is a Python int), as it is restored.
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      apply_fn=model.apply,
      params=params,
      tx=tx,
      opt_state=tx.init(params),
      ema_params=params if use_ema else None,
  )


def metrics_collection(extra: tuple[str, ...]) -> type[metrics.Collection]:
  """Loss, accuracy, gradient norm and the objective's extras, averaged over
  a log window; the learning rate at its end."""
  names = ('loss', 'accuracy', 'grad_norm') + tuple(extra)
  fields = {n: metrics.Average.from_output(n) for n in names}
  fields['learning_rate'] = metrics.LastValue.from_output('learning_rate')
  return metrics.Collection.create(**fields)


@dataclasses.dataclass(frozen=True)
class Trainer:
  """A model family's train state and jitted step, on a mesh.

  init(key): a fresh state (the family's first weights), replicated.
  abstract(): the state's shapes and dtypes, replicated, to restore onto.
  step(state, batch, metrics, rates, position) -> (state, metrics): one
    update at the learning rates of that schedule position (which the
    objective also reads: deferred re-weighting); the metrics accumulate
    over a log window.
  rates_along(horizon): position -> the learning rates there, jitted.
  """

  init: Callable[[jax.Array], TrainState]
  abstract: Callable[[], TrainState]
  step: Callable[..., tuple[TrainState, metrics.Collection]]
  rates_along: Callable[[int], Callable[[Any], Rates]]
  metrics: type[metrics.Collection]


def build(
    config: ConfigDict, family, num_classes: int, mesh, base_key: jax.Array
) -> Trainer:
  """The trainer of a model family (families.build) under `config`: its
  objective and optimizer, the augmentation mixing and label smoothing of
  config.aug, the EMA of config.optim. Every random choice of a step
  derives from base_key and the step number alone, so a resumed run
  repeats an uninterrupted one."""
  aug, ema_decay = config.aug, config.optim.ema_decay
  objective, tx = family.objective, family.optimizer.tx
  collection = metrics_collection(objective.extra_metrics)

  def step(state: TrainState, batch, metrics_acc, rates, position):
    k_mix, k_dropout, k_model = jax.random.split(
        jax.random.fold_in(base_key, state.step), 3
    )
    labels = batch['label']
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, num_classes), aug.label_smoothing
    )
    images, targets = mixing.mix(k_mix, batch['image'], targets, aug)
    rngs = {'dropout': k_dropout, 'gumbel': k_model}

    def loss_of(params):
      return objective(params, images, targets, position, rngs)

    (loss, (logits, extras)), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state.params
    )
    new_state = state.with_rates(rates).apply_gradients(grads=grads)
    if state.ema_params is not None:
      new_state = new_state.replace(
          ema_params=optax.incremental_update(
              new_state.params, state.ema_params, 1.0 - ema_decay
          )
      )
    step_metrics = collection.single_from_model_output(
        loss=loss,
        accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
        grad_norm=optax.tree.norm(grads),
        learning_rate=rates['learning_rate'],
        **extras,
    )
    return new_state, metrics_acc.merge(step_metrics)

  use_ema = ema_decay > 0
  model = family.model
  repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  fresh = lambda key: create_state(model, family.init_params(key), tx, use_ema)
  return Trainer(
      init=jax.jit(fresh, out_shardings=repl),
      abstract=lambda: parallel.with_sharding(
          jax.eval_shape(fresh, jax.random.key(0)), repl
      ),
      step=jax.jit(
          step,
          donate_argnums=(0, 2),
          in_shardings=(repl, data, repl, repl, repl),
          out_shardings=(repl, repl),
      ),
      rates_along=lambda horizon: jax.jit(
          family.optimizer.schedules(horizon), out_shardings=repl
      ),
      metrics=collection,
  )
