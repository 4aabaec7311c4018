"""Command line: train or evaluate a model from a config file.

python -m vitjax.main --config=configs/vit.py --workdir=checkpoints/vit
python -m vitjax.main --config=configs/vit.py --workdir=... --mode=eval
python -m vitjax.main --config=configs/vit.py:cpu --config.model.depth=6 ...
"""

import contextlib
import logging as std_logging
import os
from pathlib import Path
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TF only feeds data

FLAGS = flags.FLAGS


def define_flags(values: flags.FlagValues = FLAGS) -> None:
  """The command's flags, on `values`."""
  config_flags.DEFINE_config_file(
      'config',
      None,
      'Config file, optionally with an argument: file.py:arg.',
      flag_values=values,
      lock_config=True,
  )
  flags.DEFINE_string(
      'workdir',
      None,
      'Run folder: checkpoints, metrics, TensorBoard events, reports.',
      flag_values=values,
  )
  flags.DEFINE_enum(
      'mode',
      'train',
      ['train', 'eval'],
      'train (resumes if the workdir has a checkpoint), '
      'or eval (restores eval.checkpoint).',
      flag_values=values,
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=values)


def run(config: ConfigDict, workdir: str, mode: str) -> int:
  """Trains or evaluates; returns the exit status. A user's mistake prints
  its message alone (status 2), a stop signal after its save says how to
  resume (128 + its number); a bug keeps its traceback."""
  # pylint: disable=g-import-not-at-top
  import jax
  from vitjax import errors, evaluate, parallel, time_budget, train
  from vitjax import workdir as workdir_lib
  from vitjax.measure import machine

  # A time budget counts from the command's start, imports included.
  t_start = time_budget.process_start()
  try:
    if config.train.distributed:
      if mode == 'train':
        # Refused before joining: a second job must not reach the live
        # job's coordinator, which would take it down.
        workdir_lib.WorkdirLock.check_free(Path(workdir).expanduser())
      parallel.initialize()  # before anything asks JAX for its devices
    try:
      from vitjax.data import tf_pipeline

      tf_pipeline.hide_accelerators_from_tf()
    except ImportError:  # no TensorFlow: the device pipeline needs none
      pass
    logging.info('Running on %s.', machine.summary(machine.describe()))
    if mode == 'train':
      train.train_and_evaluate(config, workdir, t_start)
    else:
      with contextlib.ExitStack() as held:
        # Evaluation writes reports and the int8 save: not beside a live
        # run's final evaluation writing the same files. (A missing workdir
        # is not made: evaluation names it.)
        path = Path(workdir).expanduser()
        if jax.process_index() == 0 and path.is_dir():
          held.enter_context(workdir_lib.WorkdirLock(path))
        evaluate.evaluate_checkpoint(config, workdir, config.eval.checkpoint)
  except errors.UserError as e:
    print(f'vitjax: {e}', file=sys.stderr, flush=True)
    return 2
  except errors.Stopped as e:
    print(f'vitjax: {e}', file=sys.stderr, flush=True)
    return e.exit_code
  return 0


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Drops orbax's INFO chatter (dozens of lines per save) from the log, and
  its warning that a save has no metrics: a step saved on SIGTERM is saved
  unvalidated on purpose, so that it never counts as the best."""
  if f'{os.sep}orbax{os.sep}' not in record.pathname:
    return True
  return record.levelno >= std_logging.WARNING and not str(
      record.msg
  ).startswith('Requested `tracked_metric`')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  sys.exit(run(FLAGS.config, FLAGS.workdir, FLAGS.mode))


def parse_flags(argv: list[str], values: flags.FlagValues = FLAGS) -> list[str]:
  """absl's flag parsing, with a mistake reported as one line and status 2
  (ml_collections puts a config file's whole traceback in its message)."""
  try:
    return values(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if len(lines) > 1 and any(l.startswith('Traceback') for l in lines):
      cause = lines[-1].split(': ', 1)[-1]  # past the exception's type
      lines = [
          lines[0].removesuffix('Error whilst parsing config file:') + cause
      ]
    message = ' '.join(lines)
  except (AttributeError, KeyError) as e:  # an override of no such field
    cause = e
    while cause.args and isinstance(cause.args[0], BaseException):
      cause = cause.args[0]  # ml_collections wraps its KeyError
    text = ' '.join(str(cause.args[0] if cause.args else cause).split())
    message = f'no such config field: {text}'
  print(f'vitjax: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


if __name__ == '__main__':
  # Defined here, not on import: a process that imports this module (the
  # tests) keeps its global flags free.
  define_flags()
  app.run(main, flags_parser=parse_flags)
