"""Two real processes through jax.distributed train as one process does.

Each process of `python -m vitjax.main --config.train.distributed=True` has
one CPU device and exchanges collectives with the other through gloo over
localhost; the reference is one process with two devices and the same
global batch. Their parameters must agree bit for bit: the same data rows
reach the same devices, and the gradient mean over two devices adds the
same two numbers in either order.
"""

import json
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vitjax import checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 93  # 6 epochs of 248 training images at batch 16


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _args(workdir: Path, data_root: Path, *extra: str) -> list[str]:
  return [
      sys.executable,
      '-m',
      'vitjax.main',
      '--config=configs/vit.py:smoke',
      f'--workdir={workdir}',
      f'--config.data.root={data_root}',
      f'--config.data.cache_dir={workdir.parent / "cache"}',
      '--config.data.val_fraction=0.2',
      '--config.train.batch_size=16',
      '--config.train.epochs=6',
      '--config.train.eval_every_epochs=1',
      '--config.train.log_every_steps=5',
      '--config.eval.batch_size=32',
      *extra,
  ]


def _env(devices: int, **more: str) -> dict[str, str]:
  # The processes compile as the test session does (conftest.py), into its
  # cache, so that each launch after the first compiles little.
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      JAX_DISABLE_MOST_OPTIMIZATIONS='1',
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      **more,
  )
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


class _Pair:
  """Two processes of one distributed run; standard error goes to files
  (a pipe nobody reads would fill and stall a process, and its peer)."""

  def __init__(self, workdir: Path, data_root: Path, *extra: str):
    port = _free_port()
    self.logs = [
        workdir.parent / f'{workdir.name}-{port}-{i}.log' for i in (0, 1)
    ]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, 'w') as err:
        self.procs.append(
            subprocess.Popen(
                _args(
                    workdir,
                    data_root,
                    '--config.train.distributed=True',
                    *extra,
                ),
                cwd=REPO,
                env=_env(
                    1,
                    JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
                    JAX_NUM_PROCESSES='2',
                    JAX_PROCESS_ID=str(i),
                ),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        )

  def finish(self, timeout: float = 300) -> list[tuple[int, str]]:
    """Each process's exit status and standard error, once it has ended."""
    for p in self.procs:
      p.wait(timeout)
    return [
        (p.returncode, log.read_text()) for p, log in zip(self.procs, self.logs)
    ]

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture
def start_pair():
  """Starts pairs of processes; kills what is left of them after the test."""
  pairs = []

  def start(*args) -> _Pair:
    pairs.append(_Pair(*args))
    return pairs[-1]

  yield start
  for pair in pairs:
    pair.kill()


def _params(workdir: Path, step: int):
  path = workdir / checkpoint.STEPS_DIR / str(step) / 'state'
  ckpt = ocp.StandardCheckpointer()
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
      ckpt.metadata(path).item_metadata.tree,
  )
  return jax.tree.map(np.asarray, ckpt.restore(path, abstract)['params'])


def _assert_same_params(a, b):
  leaves = jax.tree.leaves(jax.tree.map(np.array_equal, a, b))
  assert leaves and all(leaves)


def _wait_until(done, pair: _Pair) -> None:
  deadline = time.monotonic() + 240
  while not done():
    assert all(p.poll() is None for p in pair.procs), pair.finish()
    assert time.monotonic() < deadline
    time.sleep(0.2)


def _latest(workdir: Path) -> int:
  """The latest finished save (orbax names a step's folder once complete)."""
  return max(checkpoint.saved_steps(workdir) or [0])


@pytest.fixture(scope='module')
def one_process_run(tiny_data_root, tmp_path_factory) -> Path:
  """The reference: one process, two devices, the same global batch."""
  workdir = tmp_path_factory.mktemp('one') / 'run'
  proc = subprocess.run(
      _args(workdir, tiny_data_root, '--config.train.final_evaluation=False'),
      cwd=REPO,
      env=_env(2),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  return workdir


def test_two_processes_train_as_one_with_two_devices(
    one_process_run, tiny_data_root, tmp_path, start_pair
):
  workdir = tmp_path / 'run'
  for code, stderr in start_pair(workdir, tiny_data_root).finish():
    assert code == 0, stderr
  with checkpoint.Checkpoints(workdir) as ckpts:
    assert ckpts.latest_step() == STEPS
    assert ckpts.best_step() is not None
  _assert_same_params(_params(workdir, STEPS), _params(one_process_run, STEPS))
  # Written once: one report, one record per logged step.
  assert [p.name for p in (workdir / 'eval').glob('report_*.json')] == [
      'report_best.json'
  ]
  assert (workdir / 'eval' / 'attention.png').exists()
  records = [
      json.loads(line)
      for line in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  steps = [r['step'] for r in records if r['split'] == 'train']
  assert len(steps) == len(set(steps)) > STEPS // 5


def test_a_stop_or_a_kill_of_one_process_resumes_exactly(
    one_process_run, tiny_data_root, tmp_path, start_pair
):
  workdir = tmp_path / 'run'
  no_eval = '--config.train.final_evaluation=False'
  run = start_pair(workdir, tiny_data_root, no_eval)
  lock = workdir / '.lock'
  _wait_until(lambda: lock.exists() and lock.read_text(), run)
  # A second pair on the busy workdir is refused on both of its processes,
  # before either joins a coordinator.
  refused = start_pair(workdir, tiny_data_root, no_eval).finish()
  assert [code for code, _ in refused] == [2, 2], refused
  assert all('is in use by a live run' in err for _, err in refused)
  # SIGTERM to one process: both save the same step and stop.
  _wait_until(lambda: _latest(workdir) > 0, run)
  run.procs[1].send_signal(signal.SIGTERM)
  stopped = run.finish()
  assert [code for code, _ in stopped] == [143, 143], stopped
  assert 'stopped by a signal to another process' in stopped[0][1]
  assert 'stopped by SIGTERM' in stopped[1][1]
  stopped_at = _latest(workdir)
  assert 0 < stopped_at < STEPS
  # Resumed, then one process killed outright and the job torn down.
  run = start_pair(workdir, tiny_data_root, no_eval)
  _wait_until(lambda: _latest(workdir) > stopped_at, run)
  run.procs[0].kill()
  time.sleep(1)
  run.kill()  # what a scheduler does to the rest of a failed job
  killed_at = _latest(workdir)
  assert stopped_at < killed_at < STEPS
  for code, stderr in start_pair(workdir, tiny_data_root, no_eval).finish():
    assert code == 0, stderr
    assert f'Resuming from step {killed_at} of {STEPS}' in stderr
  _assert_same_params(_params(workdir, STEPS), _params(one_process_run, STEPS))
