"""One run over several processes: starting jax.distributed, and agreeing.

With train.distributed=True every process (one per host, or per group of
devices) runs the same command and joins JAX's multi-process runtime:
JAX_COORDINATOR_ADDRESS (process 0's host:port, read by jax itself),
JAX_NUM_PROCESSES and JAX_PROCESS_ID (passed on here) name the job; where
they are unset, jax detects its cluster (SLURM, Open MPI, Kubernetes, TPU
pods). From then on the mesh spans every process's devices: the parameters
are replicated, each process feeds its own rows of the global batch, and
the train step's gradient mean is one collective.

What a process decides alone (a clock reading, a signal it received, a file
it could not lock) must not steer a run that the others run in lock step:
such decisions go through `from_process_0`, `any_process` or
`raise_together`, which every process calls at the same point.
"""

from __future__ import annotations

import hashlib
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vitjax import errors

ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def initialize() -> None:
  """Joins the multi-process runtime; call it before any other JAX call."""
  if jax.distributed.is_initialized():
    return
  num, pid = (os.environ.get(v) for v in (ENV_NUM_PROCESSES, ENV_PROCESS_ID))
  # CPU processes exchange their collectives through gloo (GPUs use NCCL).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # jax's preemption service would take SIGTERM and sit on it; vitjax's own
  # handler (stopping.py) saves and stops every process together.
  jax.config.update('jax_enable_preemption_service', False)
  try:
    jax.distributed.initialize(
        num_processes=None if num is None else int(num),
        process_id=None if pid is None else int(pid),
    )
  except (ValueError, RuntimeError) as e:
    raise errors.ConfigError(
        f'train.distributed=True, but jax.distributed did not start: {e}. '
        'Give every process JAX_COORDINATOR_ADDRESS (host:port of process '
        f'0), {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (0 .. count - 1), or '
        'run under a cluster manager that jax detects (e.g. SLURM).'
    ) from None
  logging.info(
      'Process %d of %d; %d local of %d devices.',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def from_process_0(value: int) -> int:
  """Process 0's value, on every process."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def any_process(flag: bool) -> bool:
  """Whether the flag is set on any process."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.any(flags))


def raise_together(error: Exception | None, elsewhere: str) -> None:
  """Raises `error` where it happened and an error saying `elsewhere` on the
  other processes, so that none goes on alone into a collective."""
  if any_process(error is not None):
    if error is not None:
      raise error
    raise errors.UserError(elsewhere)


def check_same(description: str, what: str) -> None:
  """Raises on every process unless `description` is the same on all."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(description.encode()).digest()
  digests = multihost_utils.process_allgather(
      np.asarray(int.from_bytes(digest[:3], 'big'), np.int32)
  )
  if len(set(np.ravel(digests).tolist())) > 1:
    raise errors.ConfigError(
        f'the processes of this run differ in {what}: start every one with '
        'the same command on the same data and workdir.'
    )


def barrier(name: str) -> None:
  """Waits until every process has reached this point."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
