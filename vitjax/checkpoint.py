"""Orbax checkpoints of a run: one manager keeps the latest and the best.

<workdir>/steps/<step>/ holds the train state ('state'), a JSON 'meta' item
(the resolved number of training steps and the training seconds so far)
and, for a validated step, orbax's metrics (its validation balanced
accuracy). The manager's preservation policy keeps the `keep` latest steps
and the best validated one, so latest and best are never out of step.
Orbax writes into a temporary folder and renames it when complete: a run
killed mid-save leaves the earlier steps intact.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import shutil
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from vitjax import errors, parallel

STEPS_DIR = 'steps'
# Where a time budget's planning times a save (scratch_saver).
_SCRATCH_DIR = 'planning_save'
_SCORE = 'val_balanced_accuracy'


class CheckpointError(errors.UserError):
  """A checkpoint is missing or does not fit the model; says what to do."""


def parse_which(which: str | int, option: str = 'eval.checkpoint') -> str | int:
  """'best', 'latest' or a step number; anything else is a CheckpointError
  that names the `option` it came from."""
  if which in ('best', 'latest'):
    return which
  try:
    return int(which)
  except ValueError:
    raise CheckpointError(
        f"{option}={which!r}: expected 'best', 'latest' or a step number."
    ) from None


def _rank(metrics: dict[str, Any]) -> tuple[float, int]:
  # A new best must be strictly better: of equal scores the earlier wins.
  # orbax only sorts by this key (best_step, BestN), so a tuple serves.
  return metrics[_SCORE], -metrics['step']


def saved_steps(workdir: Path) -> list[int]:
  """The workdir's finished saves (orbax names them by step; a save in
  progress has a temporary name)."""
  steps = Path(workdir) / STEPS_DIR
  if not steps.is_dir():
    return []
  return sorted(int(p.name) for p in steps.iterdir() if p.name.isdigit())


def has_steps(workdir: Path) -> bool:
  return bool(saved_steps(workdir))


@contextlib.contextmanager
def scratch_saver(workdir: Path) -> Iterator[Callable[[Any], None]]:
  """save(state): saves as a run saves its steps, into a folder of workdir
  that is removed on exit (what a time budget's planning times). Every
  process of the run enters it."""
  directory = Path(workdir) / _SCRATCH_DIR

  def remove(when: str):  # also what a killed run left
    parallel.barrier(f'scratch_saver_{when}')
    if jax.process_index() == 0:
      shutil.rmtree(directory, ignore_errors=True)
    parallel.barrier(f'scratch_saver_{when}_removed')

  remove('enter')
  try:
    with Checkpoints(directory, keep=1) as ckpts:
      yield lambda state: ckpts.save(state, {'step': 0}, None)
  finally:
    remove('exit')


class Checkpoints:
  """The saved steps of one workdir."""

  def __init__(self, workdir: Path, keep: int = 2):
    # orbax's asynchronous writers need absolute paths; `--workdir` is
    # usually relative (checkpoints/vit_cpu).
    self.directory = Path(workdir).absolute() / STEPS_DIR
    policies = ocp.checkpoint_managers
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True,
            best_fn=_rank,
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(keep),
                    policies.BestN(
                        get_metric_fn=_rank,
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
        ),
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
        },
    )

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def save(
      self, state: Any, meta: dict[str, Any], val_score: float | None
  ) -> None:
    """Saves state at meta['step']; val_score ranks it (None: not validated,
    so never the best)."""
    step = int(meta['step'])
    if step in self._manager.all_steps():
      return
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        ),
        metrics=None
        if val_score is None
        else {_SCORE: val_score, 'step': step},
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a save in flight, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best validated step (None if no step was validated)."""
    return self._manager.best_step()

  def best_score(self) -> float:
    """The best validation balanced accuracy saved so far, or -inf."""
    step = self.best_step()
    return (
        -np.inf if step is None else float(self._manager.metrics(step)[_SCORE])
    )

  def read_meta(self, which: str | int = 'latest') -> dict[str, Any] | None:
    step = self._locate(which, required=False)
    if step is None:
      return None
    return dict(
        self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
    )

  def restore(
      self, abstract_state: Any, which: str | int = 'latest'
  ) -> tuple[Any, dict[str, Any]]:
    """Restores `which` ('latest', 'best' or a step) onto abstract_state."""
    step = self._locate(which, required=True)
    self._check_fits(step, abstract_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, dict(restored.meta)

  def step_of(self, which: str | int) -> int:
    """The step `which` ('latest', 'best' or a step) names; an error that
    says what to do when there is none."""
    return self._locate(which, required=True)

  def restore_weights(
      self, abstract_params: Any, which: str | int = 'best', ema: bool = False
  ) -> tuple[Any, int]:
    """Only the model's weights of `which` (the EMA's with `ema`), for
    inference: an orbax partial restore of the saved train state, which
    needs neither the optimizer's structure nor the training data.
    Returns (params, step)."""
    step = self._locate(which, required=True)
    key = 'ema_params' if ema else 'params'
    self._check_fits(step, {key: abstract_params})
    item = {key: abstract_params}
    restored = ocp.PyTreeCheckpointer().restore(
        self.directory / str(step) / 'state',
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
    return restored[key], step

  def _locate(self, which: str | int, *, required: bool) -> int | None:
    steps = self._manager.all_steps()
    which = parse_which(which)
    if which == 'best':
      step = self.best_step()
    elif which == 'latest':
      step = self.latest_step()
    else:
      step = which
      if step not in steps:
        if not required:
          return None
        raise CheckpointError(
            f'no checkpoint at step {step} in {str(self.directory)!r}; it '
            f'has steps {sorted(steps)} (best: {self.best_step()}).'
        )
    if step is None and required:
      what = (
          'no checkpoint'
          if not steps
          else f'no validated checkpoint (steps {sorted(steps)})'
      )
      raise CheckpointError(
          f'{what} in {str(self.directory)!r} to take as {which!r}. Train '
          'first: python -m vitjax.main --config=<the same config> '
          f'--workdir={str(self.directory.parent)!r}'
      )
    return step

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Names the first array whose saved shape differs from the model's."""
    saved = {
        _path(p): tuple(m.shape)
        for p, m in jax.tree_util.tree_flatten_with_path(
            self._manager.item_metadata(step)['state']
        )[0]
        if hasattr(m, 'shape')
    }
    wanted = {
        _path(p): tuple(np.shape(a))
        for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    where = f'the checkpoint at step {step} in {str(self.directory)!r}'
    hint = (
        'Evaluate with the config that trained it (its config.json is '
        f'in {str(self.directory.parent)!r}), or use another --workdir.'
    )
    missing = sorted(set(wanted) - set(saved))
    if missing:
      raise CheckpointError(
          f'{where} has no {missing[0]} (and '
          f'{len(missing) - 1} more arrays the model '
          'needs). ' + hint
      )
    for path, shape in wanted.items():
      if saved[path] != shape:
        raise CheckpointError(
            f'{where} does not fit the model: {path} is '
            f'{saved[path]} there but {shape} here. ' + hint
        )


def _path(keys) -> str:
  """'params/blocks_0/attn/query/kernel', whatever the containers' types
  (the saved metadata has dicts where the live state has dataclasses)."""
  parts = []
  for k in keys:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)
