"""Data parallelism: one mesh axis over every device of every host.

Parameters and optimizer state are replicated; batches are sharded on their
leading axis. The same code runs on one CPU, several GPUs, or several hosts
(vitjax/distributed.py), each process feeding the rows its devices hold.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from vitjax import errors

AXIS = 'data'


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
