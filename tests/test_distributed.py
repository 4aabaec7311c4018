"""Two real processes through jax.distributed train as one process does.

Each process of `python -m vitjax.main --config.train.distributed=True` has
one CPU device and exchanges collectives with the other through gloo over
localhost; the reference is one process with two devices and the same
global batch. Their parameters must agree bit for bit: the same data rows
reach the same devices, and the gradient mean over two devices adds the
same two numbers in either order.
"""

import json
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

from vitjax import checkpoint, main, train

from tests.conftest import smoke, subprocess_env

pytestmark = pytest.mark.slow  # every test starts processes

REPO = Path(__file__).resolve().parents[1]
STEPS = 93  # 6 epochs of 248 training images at batch 16, validated every 2


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
      # The rest as conftest.smoke sets it.
      '--config.data.val_fraction=0.2',
      '--config.data.log_sampled_images=32',
      '--config.train.batch_size=16',
      '--config.train.epochs=6',
      '--config.train.eval_every_epochs=2',
      '--config.train.log_every_steps=5',
      '--config.eval.batch_size=32',
      '--config.eval.speed_batch=16',
      '--config.eval.speed_seconds=0.02',
      '--config.eval.speed_rounds=2',
      *extra,
  ]


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
                env=subprocess_env(
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
  """The reference: one process (this one), two devices, the same config
  and global batch, compiled as the processes compile
  (tests/conftest.py)."""
  workdir = tmp_path_factory.mktemp('one') / 'run'
  config = smoke(tiny_data_root, workdir.parent / 'cache')
  config.train.epochs, config.train.eval_every_epochs = 6.0, 2.0
  config.train.final_evaluation = False
  train.train_and_evaluate(config, str(workdir))
  return workdir


def test_two_processes_train_as_one_through_a_stop(
    one_process_run, tiny_data_root, tmp_path, start_pair, capsys
):
  workdir = tmp_path / 'run'
  run = start_pair(workdir, tiny_data_root)
  lock = workdir / '.lock'
  _wait_until(lambda: lock.exists() and lock.read_text(), run)
  # A process of a second job on the busy workdir is refused before it
  # joins any coordinator (this one, which never joins one).
  second = smoke(tiny_data_root, tmp_path / 'cache')
  second.train.distributed = True
  assert main.run(second, str(workdir), 'train') == 2
  assert 'is in use by a live run' in capsys.readouterr().err
  # SIGTERM to one process: both save the same step and stop.
  _wait_until(lambda: _latest(workdir) > 0, run)
  run.procs[1].send_signal(signal.SIGTERM)
  stopped = run.finish()
  assert [code for code, _ in stopped] == [143, 143], stopped
  assert 'stopped by a signal to another process' in stopped[0][1]
  assert 'stopped by SIGTERM' in stopped[1][1]
  stopped_at = _latest(workdir)
  assert 0 < stopped_at < STEPS
  # Resumed on both, to the end.
  for code, stderr in start_pair(workdir, tiny_data_root).finish():
    assert code == 0, stderr
    assert f'Resuming from step {stopped_at} of {STEPS}' in stderr
  # The parameters of one process with two devices, bit for bit.
  _assert_same_params(_params(workdir, STEPS), _params(one_process_run, STEPS))
  with checkpoint.Checkpoints(workdir) as ckpts:
    assert ckpts.best_step() is not None
  # Written once: one report, one record per logged step.
  assert [p.name for p in (workdir / 'eval').glob('report_*.json')] == [
      'report_best.json'
  ]
  assert (workdir / 'eval' / 'attention.png').exists()
  records = [
      json.loads(line)
      for line in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  logged = [r['step'] for r in records if r['split'] == 'train']
  assert len(logged) == len(set(logged)) > STEPS // 5
