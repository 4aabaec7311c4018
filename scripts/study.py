"""The imbalance study: which treatment of the skewed training set helps.

  python scripts/study.py --out=reports/study --root=checkpoints/study

trains the same model (--config, the CPU preset by default) once per
imbalance treatment and seed, for a fixed number of epochs (not a time
budget, so that rows compare across machines), and reports the balanced
test set per treatment: mean and standard deviation over the seeds, each
difference from untreated training set against its standard error. Each
run picks its best checkpoint on validation balanced accuracy; the test set
only reports. Written to --out: study.md, study.json,
study_accuracy.png and study_recall.png.

A rerun skips the runs that finished (their workdir holds
eval/report_best.json) and resumes an interrupted one from its checkpoint.
On a GPU, the full recipe with a bigger budget:

  python scripts/study.py --config=configs/vit.py --epochs=200 \
      --out=reports/study_gpu --root=checkpoints/study_gpu
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
import signal
from signal import SIGINT, SIGTERM
import subprocess
import sys
import time

from absl import app, flags, logging
import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CONFIG = flags.DEFINE_string(
    'config', 'configs/vit.py:cpu', 'The config every run starts from.'
)
_EPOCHS = flags.DEFINE_float('epochs', 2.0, 'Training epochs per run.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'config.seed per run.')
_TREATMENTS = flags.DEFINE_list(
    'treatments', [], 'Names of the treatments to run (default: all).'
)
_ROOT = flags.DEFINE_string(
    'root', 'checkpoints/study', 'Holds <treatment>/seed_<k> workdirs.'
)
_OUT = flags.DEFINE_string('out', 'reports/study', 'Report folder.')
_SET = flags.DEFINE_multi_string(
    'set', [], 'Another override for every run, e.g. --set=model.depth=6.'
)

# Deferred re-weighting switches its weights on at this share of the run,
# as Cao et al. 2019 (epoch 160 of 200).
DRW_START = 0.8
# Warmup as a share of the run, whatever the config's warmup in epochs.
WARMUP_SHARE = 0.1
# Validations per run (each may become the best checkpoint).
VALIDATIONS = 4


@dataclasses.dataclass(frozen=True)
class Treatment:
  name: str  # also the workdir's folder
  label: str
  sampling: str = 'natural'
  loss: str = 'ce'
  class_weights: str = 'none'
  deferred: bool = False  # class weights from DRW_START of the run on

  def overrides(self, epochs: float) -> dict[str, object]:
    """Every imbalance field, so that the config's own choice never leaks."""
    return {
        'data.sampling': self.sampling,
        'loss.name': self.loss,
        'loss.class_weights': self.class_weights,
        'loss.reweight_from_epoch': (
            DRW_START * epochs if self.deferred else 0.0
        ),
        'loss.effective_beta': 0.9999,
        'loss.focal_gamma': 2.0,
        'loss.logit_adjust_tau': 1.0,
    }


# One correction each: combinations that correct twice are left out (the
# loss follows the sampled distribution, so they would not stack anyway).
TREATMENTS = (
    Treatment('natural_ce', 'natural sampling + CE (no treatment)'),
    Treatment('balanced', 'balanced oversampling + CE', sampling='balanced'),
    Treatment('sqrt', 'sqrt sampling + CE', sampling='sqrt'),
    Treatment(
        'inverse', 'inverse-frequency weighted CE', class_weights='inverse'
    ),
    Treatment(
        'effective',
        'effective-number weighted CE (beta 0.9999)',
        class_weights='effective',
    ),
    Treatment('focal', 'focal loss (gamma 2)', loss='focal'),
    Treatment(
        'logit_adjusted', 'logit-adjusted CE (tau 1)', loss='logit_adjusted'
    ),
    Treatment(
        'drw',
        f'CE, effective-number weights from {DRW_START:.0%} of the run (DRW)',
        class_weights='effective',
        deferred=True,
    ),
)
BASELINE = 'natural_ce'


def run_overrides(
    treatment: Treatment, seed: int, epochs: float, extra: list[str]
) -> list[str]:
  """`--config.x=v` overrides of one run: the study's fixed schedule, the
  treatment, then --set's (which may not touch either)."""
  fixed = {
      'seed': seed,
      'train.time_budget_minutes': 0.0,
      'train.epochs': epochs,
      'train.eval_every_epochs': epochs / VALIDATIONS,
      'train.final_evaluation': True,
      'optim.warmup_epochs': WARMUP_SHARE * epochs,
      # Every token, as when docs/imbalance.md's study was measured (the preset
      # has since dropped 75% of them in training, for its time budget).
      'model.patch_dropout': 0.0,
      **treatment.overrides(epochs),
  }
  for s in extra:
    if s.split('=', 1)[0] in fixed:
      raise app.UsageError(
          f'--set={s}: the study sets {s.split("=", 1)[0]} itself (its '
          'schedule and treatments); choose another field.'
      )
  return [f'--config.{k}={v}' for k, v in fixed.items()] + [
      f'--config.{s}' for s in extra
  ]


def intended_config(config: str, overrides: list[str]):
  """The config a run's command line makes, parsed as vitjax.main parses
  it (ml_collections), with the machine's choices made concrete as a run
  records them."""
  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  from vitjax import models

  argv = ['study', f'--config={config}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, flag_values=values, sys_argv=argv
  )
  values(argv)
  return models.with_machine_choices(values.config)


def is_finished(workdir: Path, config) -> bool:
  """Whether workdir holds this run, trained to its end and evaluated.

  A workdir with another config is refused: its report would be counted
  under settings it was not trained with.
  """
  # pylint: disable=g-import-not-at-top
  from vitjax import checkpoint, workdir as workdir_lib

  if not (workdir / 'config.json').exists():
    return False
  diffs = workdir_lib.config_differences(workdir, config)
  if diffs:
    raise SystemExit(
        f'study: {workdir} holds a run with other settings: '
        f'{"; ".join(diffs[:3])}. Pass another --root for these settings.'
    )
  if not (workdir / 'eval' / 'report_best.json').exists():
    return False
  with checkpoint.Checkpoints(workdir) as ckpts:
    meta = ckpts.read_meta('latest')
  return meta is not None and meta['step'] == meta['total_steps']


def run(cmd: list[str], log_path: Path) -> int:
  """Runs cmd to its end; a SIGINT or SIGTERM to the study is passed on
  once, so the run saves its step and stops cleanly (it runs in its own
  session: Ctrl-C reaches it only through here)."""
  with open(log_path, 'a') as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
  forward = lambda signum, frame: proc.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in (SIGINT, SIGTERM)}
  try:
    return proc.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def run_all(
    treatments, seeds, root: Path, config: str, epochs: float, extra
) -> dict[str, list[Path]]:
  """Runs what has not finished; returns each treatment's report files."""
  reports = {}
  for t in treatments:
    for seed in seeds:
      workdir = root / t.name / f'seed_{seed}'
      reports.setdefault(t.name, []).append(
          workdir / 'eval' / 'report_best.json'
      )
      overrides = run_overrides(t, seed, epochs, extra)
      if is_finished(workdir, intended_config(config, overrides)):
        logging.info('%s seed %d: finished earlier', t.name, seed)
        continue
      workdir.mkdir(parents=True, exist_ok=True)
      cmd = [
          sys.executable,
          '-m',
          'vitjax.main',
          f'--config={config}',
          f'--workdir={workdir}',
          *overrides,
      ]
      logging.info('%s seed %d: %s', t.name, seed, ' '.join(cmd[1:]))
      start = time.perf_counter()
      code = run(cmd, workdir / 'run.log')
      if code in (128 + SIGINT, 128 + SIGTERM):
        raise SystemExit(
            f'study: stopped; {t.name} seed {seed} saved its step in '
            f'{workdir}. Rerun the same command to resume.'
        )
      if code != 0:
        tail = (workdir / 'run.log').read_text().strip().splitlines()[-5:]
        raise SystemExit(
            f'study: {t.name} seed {seed} failed (exit {code}); '
            f'its log is {workdir / "run.log"}:\n' + '\n'.join(tail)
        )
      logging.info(
          '%s seed %d: done in %.0f s',
          t.name,
          seed,
          time.perf_counter() - start,
      )
  return reports


def _mean_std(values) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {
      'mean': float(v.mean()),
      'std': float(v.std(ddof=1)) if v.size > 1 else float('nan'),
      'n': int(v.size),
  }


def summarize(
    runs: dict[str, list[dict]], minority: list[int]
) -> dict[str, dict]:
  """Per treatment: mean and std over seeds of each figure, and the
  seed-by-seed (paired: same split, first weights and data order)
  difference of balanced test accuracy from BASELINE, with its standard
  error. runs: per treatment, the reports in seed order, each with the
  run's 'total_steps'."""
  rows = {}
  for name, reports in runs.items():
    recall = np.array([r['test']['per_class_recall'] for r in reports])
    rows[name] = {
        'seeds': len(reports),
        'balanced_accuracy': _mean_std(
            [r['test']['balanced_accuracy'] for r in reports]
        ),
        'accuracy': _mean_std([r['test']['accuracy'] for r in reports]),
        'worst_class_recall': _mean_std(
            [r['test']['worst_class_recall'] for r in reports]
        ),
        'minority_recall': _mean_std(recall[:, minority].mean(1)),
        'per_class_recall': recall.mean(0).tolist(),
        'val_balanced_accuracy': _mean_std(
            [r['val']['balanced_accuracy'] for r in reports]
        ),
        # Where in the run validation found each seed's best checkpoint.
        'best_step_share': [r['step'] / r['total_steps'] for r in reports],
    }
  if BASELINE not in runs:
    return rows
  base = [r['test']['balanced_accuracy'] for r in runs[BASELINE]]
  for name, reports in runs.items():
    diffs = np.array(
        [r['test']['balanced_accuracy'] for r in reports]
    ) - np.array(base)
    se = (
        float(diffs.std(ddof=1) / np.sqrt(diffs.size))
        if diffs.size > 1
        else float('nan')
    )
    rows[name]['difference_from_baseline'] = {
        'mean': float(diffs.mean()),
        'standard_error': se,
        'measurable': bool(abs(diffs.mean()) > 2 * se),  # False if nan
    }
  return rows


def _pct(s: dict[str, float]) -> str:
  if s['n'] < 2:
    return f'{100 * s["mean"]:.2f}'
  return f'{100 * s["mean"]:.2f} ± {100 * s["std"]:.2f}'


def markdown(rows, treatments, class_names, minority, heading) -> str:
  minority_names = ' + '.join(class_names[i] for i in minority)
  cols = (
      'treatment',
      'balanced test acc. (%)',
      'top-1 (%)',
      'worst class (%)',
      f'{minority_names} recall (%)',
      'val balanced acc. (%)',
      'best checkpoint at',
      f'vs {BASELINE}, paired (points ± SE)',
  )
  lines = [
      heading,
      '',
      '| ' + ' | '.join(cols) + ' |',
      '|' + '---|' * len(cols),
  ]
  for t in treatments:
    r = rows[t.name]
    d = r.get('difference_from_baseline')
    if t.name == BASELINE or d is None:
      verdict = '-'
    elif r['seeds'] < 2:
      verdict = f'{100 * d["mean"]:+.2f} (one seed: no spread)'
    else:
      verdict = f'{100 * d["mean"]:+.2f} ± {100 * d["standard_error"]:.2f}' + (
          ' (measurable)' if d['measurable'] else ' (within spread)'
      )
    lines.append(
        '| '
        + ' | '.join(
            [
                t.label,
                _pct(r['balanced_accuracy']),
                _pct(r['accuracy']),
                _pct(r['worst_class_recall']),
                _pct(r['minority_recall']),
                _pct(r['val_balanced_accuracy']),
                ', '.join(f'{x:.0%}' for x in r['best_step_share']),
                verdict,
            ]
        )
        + ' |'
    )
  return '\n'.join(lines) + '\n'


def plots(rows, treatments, class_names, out: Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = [t.name for t in treatments]
  fig, ax = plt.subplots(figsize=(9, 4))
  for offset, key, label in (
      (-0.2, 'balanced_accuracy', 'test balanced'),
      (0.2, 'val_balanced_accuracy', 'val balanced'),
  ):
    ax.bar(
        np.arange(len(names)) + offset,
        [100 * rows[n][key]['mean'] for n in names],
        0.4,
        yerr=[100 * rows[n][key]['std'] for n in names],
        capsize=3,
        label=f'{label} (mean ± std over seeds)',
    )
  ends = [
      100 * (rows[n][k]['mean'] + sign * np.nan_to_num(rows[n][k]['std']))
      for n in names
      for k in ('balanced_accuracy', 'val_balanced_accuracy')
      for sign in (-1, 1)
  ]
  ax.set_ylim(max(0, min(ends) - 5), min(100, max(ends) + 3))
  ax.set_xticks(range(len(names)), names, rotation=20, ha='right')
  ax.set(ylabel='balanced accuracy (%)', title='imbalance treatments')
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / 'study_accuracy.png', dpi=100)
  plt.close(fig)

  recall = 100 * np.array([rows[n]['per_class_recall'] for n in names])
  fig, ax = plt.subplots(figsize=(10, 4.5))
  im = ax.imshow(recall, cmap='viridis', aspect='auto')
  ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha='right')
  ax.set_yticks(range(len(names)), names)
  for i in range(len(names)):
    for j in range(len(class_names)):
      ax.text(
          j,
          i,
          f'{recall[i, j]:.0f}',
          ha='center',
          va='center',
          fontsize=7,
          color='white' if recall[i, j] < recall.mean() else 'black',
      )
  ax.set(title='test recall per class (%), mean over seeds')
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(out / 'study_recall.png', dpi=100)
  plt.close(fig)


def _read_run(report_path: Path) -> dict:
  """A run's report, with its total steps (from its latest checkpoint)."""
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top

  report = json.loads(report_path.read_text())
  with checkpoint.Checkpoints(report_path.parent.parent) as ckpts:
    report['total_steps'] = ckpts.read_meta('latest')['total_steps']
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict
  from vitjax.measure import machine
  from vitjax.data import sources

  by_name = {t.name: t for t in TREATMENTS}
  unknown = set(_TREATMENTS.value) - set(by_name)
  if unknown:
    raise app.UsageError(
        f'no treatment named {sorted(unknown)}; the treatments: '
        f'{list(by_name)}.'
    )
  treatments = [
      t for t in TREATMENTS if t.name in (_TREATMENTS.value or by_name)
  ]
  seeds = [int(s) for s in _SEEDS.value]
  root, out = Path(_ROOT.value), Path(_OUT.value)
  files = run_all(
      treatments, seeds, root, _CONFIG.value, _EPOCHS.value, _SET.value
  )
  runs = {n: [_read_run(p) for p in ps] for n, ps in files.items()}
  first = runs[treatments[0].name][0]
  config = ConfigDict(
      json.loads((Path(first['workdir']) / 'config.json').read_text())
  )
  # The two classes with the fewest training images (truck and ship in the
  # course's set).
  counts = sources.load(config.data, config.seed).train.counts(
      len(first['class_names'])
  )
  minority = sorted(np.argsort(counts, kind='stable')[:2].tolist())
  rows = summarize(runs, minority)
  class_names = first['class_names']
  out.mkdir(parents=True, exist_ok=True)
  minutes = np.median([r['train_seconds'] for rs in runs.values() for r in rs])
  heading = (
      f'# Imbalance treatments ({machine.summary(first["machine"])})\n\n'
      f'`{config.model.name}` from `{_CONFIG.value}`, {_EPOCHS.value:g} epochs '
      f'per run (median {minutes / 60:.1f} min of training), seeds '
      f'{", ".join(map(str, seeds))}; each run\'s best checkpoint chosen on '
      'validation balanced accuracy, then evaluated once on the balanced '
      f'test set ({first["test"]["num_images"]:,} images). Figures are mean '
      '± std over the seeds. The last column is the seed-by-seed difference '
      'from no treatment (same split, first weights and data order) with '
      'its standard error; "measurable" marks one beyond two standard '
      'errors: a screen (at 3 seeds about 80% confidence), not a '
      'significance test. "within spread": no measurable effect.'
  )
  text = markdown(rows, treatments, class_names, minority, heading)
  (out / 'study.md').write_text(text)
  (out / 'study.json').write_text(
      json.dumps(
          {
              'config': _CONFIG.value,
              'epochs': _EPOCHS.value,
              'seeds': seeds,
              'overrides': _SET.value,
              'machine': first['machine'],
              'minority_classes': [class_names[i] for i in minority],
              'treatments': {
                  t.name: {
                      'label': t.label,
                      'overrides': t.overrides(_EPOCHS.value),
                      **rows[t.name],
                  }
                  for t in treatments
              },
              'class_names': class_names,
          },
          indent=1,
      )
  )
  plots(rows, treatments, class_names, out)
  print(text)


if __name__ == '__main__':
  app.run(main)
