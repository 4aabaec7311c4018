"""Orbax checkpoints of a workdir (latest and best) and the workdir's lock.

Layout: <workdir>/checkpoints/latest/<step>/ keeps the last few saves;
<workdir>/checkpoints/best/<step>/ keeps the one with the best validation
balanced accuracy. Each holds the train state and a JSON `meta` item (the
step, the resolved number of training steps, the metric). Orbax writes to a
temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing or does not fit the model; says what to do."""


class WorkdirLock:
  """An exclusive lock on a workdir, released when the process ends."""

  def __init__(self, workdir: Path):
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / '.lock'
    self._file = open(self._path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'another process'
      self._file.close()
      raise RuntimeError(
          f'workdir {str(workdir)!r} is in use by a live run ({holder}). '
          'Wait for it to finish, stop it, or pass another --workdir.'
      ) from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    self._file.flush()

  def release(self) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def _manager(path: Path, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                 create=True),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


class Checkpoints:
  """The latest and best checkpoints of one workdir."""

  def __init__(self, workdir: Path, keep: int = 2):
    # orbax's asynchronous writers need absolute paths; `--workdir` is
    # usually relative (checkpoints/vit_cpu).
    self._dir = Path(workdir).absolute() / 'checkpoints'
    self._latest = _manager(self._dir / 'latest', keep)
    self._best = _manager(self._dir / 'best', 1)

  def save(self, state: Any, meta: dict[str, Any], *, best: bool) -> None:
    step = int(meta['step'])
    args = lambda: ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta))
    if self._latest.latest_step() != step:
      self._latest.save(step, args=args())
    if best and self._best.latest_step() != step:
      self._best.save(step, args=args())

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def read_meta(self, which: str | int = 'latest') -> dict[str, Any] | None:
    found = self._locate(which, required=False)
    if found is None:
      return None
    mngr, step = found
    return dict(mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta)

  def restore(self, abstract_state: Any, which: str | int = 'latest'
              ) -> tuple[Any, dict[str, Any]]:
    """Restores `which` ('latest', 'best' or a step) onto abstract_state."""
    mngr, step = self._locate(which, required=True)
    _check_fits(mngr, step, abstract_state, self._dir)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def _locate(self, which, *, required: bool):
    if which == 'best':
      mngr, step = self._best, self._best.latest_step()
    elif which == 'latest':
      mngr, step = self._latest, self._latest.latest_step()
    else:
      try:
        step = int(which)
      except ValueError:
        raise CheckpointError(
            f"eval.checkpoint={which!r}: expected 'best', 'latest' or a step "
            'number.') from None
      mngr = self._latest if step in self._latest.all_steps() else (
          self._best if step in self._best.all_steps() else None)
      if mngr is None:
        if not required:
          return None
        raise CheckpointError(
            f'no checkpoint at step {step} in {str(self._dir)!r}; it has '
            f'latest {self._latest.all_steps()} and best '
            f'{self._best.all_steps()}.')
    if step is None:
      if not required:
        return None
      raise CheckpointError(
          f'no {which} checkpoint in {str(self._dir)!r}. Train first: '
          'python -m vitjax.main --config=<the same config> '
          f'--workdir={str(self._dir.parent)!r}')
    return mngr, step


def _check_fits(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
                ckpt_dir: Path) -> None:
  """Names the first array whose saved shape differs from the model's."""
  saved = {_path(p): tuple(m.shape) for p, m in
           jax.tree_util.tree_flatten_with_path(
               mngr.item_metadata(step)['state'])[0] if hasattr(m, 'shape')}
  wanted = {_path(p): tuple(np.shape(a)) for p, a in
            jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  hint = (f'Evaluate with the config that trained it (its config.json is in '
          f'{str(ckpt_dir.parent)!r}), or use another --workdir.')
  missing = sorted(set(wanted) - set(saved))
  if missing:
    raise CheckpointError(f'the checkpoint at step {step} in '
                          f'{str(ckpt_dir)!r} has no {missing[0]} (and '
                          f'{len(missing) - 1} more arrays the model needs). '
                          + hint)
  for path, shape in wanted.items():
    if saved[path] != shape:
      raise CheckpointError(f'the checkpoint at step {step} in '
                            f'{str(ckpt_dir)!r} does not fit the model: '
                            f'{path} is {saved[path]} there but {shape} '
                            'here. ' + hint)


def _path(keys) -> str:
  """'params/block_0/attn/query/kernel', whatever the containers' types
  (the saved metadata has dicts where the live state has dataclasses)."""
  parts = []
  for k in keys:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)
