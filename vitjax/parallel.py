"""Data parallelism over every device of every process, and what the
processes of one run must agree on.

The mesh has one axis, `data`: parameters and optimizer state are
replicated, batches are sharded on their leading axis, and the same code
runs on one CPU, several GPUs or several hosts, each process feeding the
rows its devices hold.

With train.distributed=True every process runs the same command and joins
JAX's multi-process runtime (`initialize`). What a process decides alone (a
clock reading, a signal it received, a file it could not lock) must not
steer a run that the others run in lock step: such decisions go through
`from_process_0`, `any_process` or `raise_together`, which every process
calls at the same point.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from vitjax import errors

AXIS = 'data'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: every jit states its shardings, as jax.jit has always done
  # (make_mesh's default, Explicit, would make shardings part of types).
  return jax.make_mesh(
      (len(devices),), (AXIS,), (jax.sharding.AxisType.Auto,), devices=devices
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def with_sharding(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shapes and dtypes of `tree` placed on `sharding` (for orbax restores)."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree
  )


def check_batch(batch_size: int, mesh: Mesh, what: str) -> None:
  if batch_size % mesh.size:
    raise errors.ConfigError(
        f'{what}={batch_size} must be a multiple of the '
        f'{mesh.size} devices.'
    )


def host_batch_to_global(
    batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
  """This host's slice of a batch -> global arrays sharded over the mesh."""
  return {
      k: jax.make_array_from_process_local_data(sharding, v)
      for k, v in batch.items()
  }


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """The rows [start, stop) of a global batch that this process's devices
  hold under `batch_sharding(mesh)`: what its input pipeline must feed.

  They follow the mesh's device order, which need not be the process order.
  """
  index = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  slices = sorted(
      s[0].indices(global_batch)[:2] for s in index.values()
  )  # [(start, stop)] per local device
  for (_, stop), (start, _) in zip(slices, slices[1:]):
    if stop != start:
      raise ValueError(
          f'the batch rows of process {jax.process_index()} are not '
          f'contiguous in the mesh: {slices}.'
      )
  return slices[0][0], slices[-1][1]


def to_host(tree: Any) -> Any:
  """Global arrays -> full NumPy arrays on every host."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


def initialize() -> None:
  """Joins the multi-process runtime; call it before any other JAX call.

  JAX_COORDINATOR_ADDRESS (process 0's host:port) is read by jax itself;
  JAX_NUM_PROCESSES and JAX_PROCESS_ID are passed on here. Where they are
  unset, jax detects its cluster (SLURM, Open MPI, Kubernetes, TPU pods).
  """
  if jax.distributed.is_initialized():
    return
  num, pid = (os.environ.get(v) for v in (ENV_NUM_PROCESSES, ENV_PROCESS_ID))
  # CPU processes exchange their collectives through gloo (GPUs use NCCL).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # jax's preemption service would take SIGTERM and sit on it; the training
  # loop's own handler (train.StopRequest) saves and stops every process
  # together.
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
  """Raises on every process unless `description` is the same on all.

  multihost_utils.assert_equal compares arrays of one shape on every
  process, so the text goes as its SHA-256 digest.
  """
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(
      hashlib.sha256(description.encode()).digest(), np.uint8
  )
  try:
    multihost_utils.assert_equal(digest, what)
  except AssertionError:
    raise errors.ConfigError(
        f'the processes of this run differ in {what}: start every one with '
        'the same command on the same data and workdir.'
    ) from None


def barrier(name: str) -> None:
  """Waits until every process has reached this point."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
