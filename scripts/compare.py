"""Accuracy against cost for several runs, in float and in int8.

  python scripts/compare.py --out=reports/cpu \
      checkpoints/vit_cpu checkpoints/dynamic_vit_cpu checkpoints/avit_cpu

Each workdir's best checkpoint is evaluated with the config it was trained
with (its config.json), once in float and once in int8 (frozen int8 serving
with aqtp), on the test set. Written to --out: report.md (the table, like
the lab report's §6.2), report.json, accuracy_vs_macs.png,
per_class_recall.png and curves.png (training curves side by side).
"""

import json
import os
from pathlib import Path

from absl import app, flags, logging

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_OUT = flags.DEFINE_string('out', 'reports/latest', 'Report folder.')
_DATA_ROOT = flags.DEFINE_string('data_root', '', 'Overrides data.root.')
_INT8_PATH = flags.DEFINE_enum(
    'int8_path', 'serve', ['serve', 'fake'], 'How int8 is evaluated.'
)
_SPEED_BATCH = flags.DEFINE_integer(
    'speed_batch', 256, 'Batch of the images/s figure.'
)

COLUMNS = (
    'model',
    'precision',
    'balanced test acc.',
    'top-1',
    'worst class',
    'params',
    'MMACs/image',
    'weight MB',
    'latency bs1 (ms)',
    'images/s',
    'train time',
)


def _row(report: dict) -> dict:
  c, t = report['cost'], report['test']
  q = report.get('quantization', {})
  weight_bytes = q.get('int8_model_bytes', 4 * c['parameters'])
  minutes = report.get('train_seconds', float('nan')) / 60
  from vitjax.evaluators import report as report_lib  # pylint: disable=g-import-not-at-top

  rate, _ = report_lib.serving_images_per_second(report)
  return {
      'model': report['label'],
      'precision': report['precision'],
      'balanced test acc.': f'{100 * t["balanced_accuracy"]:.2f}%',
      'top-1': f'{100 * t["accuracy"]:.2f}%',
      'worst class': f'{100 * t["worst_class_recall"]:.1f}%',
      'params': f'{c["parameters"] / 1e6:.2f} M',
      'MMACs/image': f'{c["macs_per_image"] / 1e6:.1f}',
      'weight MB': f'{weight_bytes / 2**20:.2f}',
      'latency bs1 (ms)': f'{c["latency_ms_batch1"]:.2f}',
      'images/s': f'{rate:.0f}',
      'train time': f'{minutes:.1f} min',
  }


def main(argv):
  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict
  import numpy as np
  from vitjax import evaluate, metric_writers

  workdirs = [Path(w) for w in argv[1:]]
  if not workdirs:
    raise app.UsageError('name the workdirs to compare.')
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  reports = []
  for workdir in workdirs:
    cfg_path = workdir / 'config.json'
    if not cfg_path.exists():
      raise app.UsageError(f'{workdir} holds no run (no config.json).')
    for precision in ('float', 'int8'):
      config = ConfigDict(json.loads(cfg_path.read_text()))
      if _DATA_ROOT.value:
        config.data.root = _DATA_ROOT.value
      config.eval.speed_batch = _SPEED_BATCH.value
      config.eval.speed_seconds = 1.0
      if precision == 'int8':
        config.eval.quant, config.eval.quant_path = 'int8', _INT8_PATH.value
      logging.info('Evaluating %s in %s', workdir, precision)
      report = evaluate.evaluate_checkpoint(config, workdir, 'best')
      report['label'] = workdir.name
      reports.append(report)

  rows = [_row(r) for r in reports]
  header = [
      f'{c} bs{_SPEED_BATCH.value}' if c == 'images/s' else c for c in COLUMNS
  ]
  table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(COLUMNS)]
  table += ['| ' + ' | '.join(r[c] for c in COLUMNS) + ' |' for r in rows]
  device = reports[0]['cost']['device']
  text = '\n'.join(
      [
          f'# Accuracy against cost ({device})',
          '',
          'Best checkpoint of each run, test set '
          f'({reports[0]["test"]["num_images"]:,} images). '
          f"int8 = {_INT8_PATH.value} path with aqtp (W8A8 on the blocks' "
          'Dense layers). Latency at batch 1 and images/s at batch '
          f"{_SPEED_BATCH.value} are medians of 5 timings (A-ViT's images/s: "
          'its token-removal path).',
          '',
          *table,
          '',
      ]
  )
  (out / 'report.md').write_text(text)
  (out / 'report.json').write_text(json.dumps(reports, indent=1))
  print(text)

  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 5))
  for r in reports:
    marker = 'o' if r['precision'] == 'float' else 's'
    ax.scatter(
        r['cost']['macs_per_image'] / 1e6,
        100 * r['test']['balanced_accuracy'],
        marker=marker,
        s=50,
        label=f'{r["label"]} ({r["precision"]})',
    )
  ax.set(
      xlabel='MMACs per image',
      ylabel='balanced test accuracy (%)',
      title='accuracy against compute',
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / 'accuracy_vs_macs.png', dpi=120)
  plt.close(fig)

  floats = [r for r in reports if r['precision'] == 'float']
  names = floats[0]['class_names']
  fig, ax = plt.subplots(figsize=(10, 4))
  width = 0.8 / len(floats)
  for i, r in enumerate(floats):
    ax.bar(
        np.arange(len(names)) + i * width,
        r['test']['per_class_recall'],
        width,
        label=r['label'],
    )
  ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30)
  ax.set(ylim=(0, 1), ylabel='test recall', title='per-class recall')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / 'per_class_recall.png', dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(
      1, len(workdirs), figsize=(5 * len(workdirs), 4), squeeze=False
  )
  for ax, workdir in zip(axes[0], workdirs):
    records = metric_writers.read_records(workdir / 'metrics.jsonl')
    for split, style in (('train', '-'), ('val', 'o-')):
      rows_ = [r for r in records if r['split'] == split]
      ax.plot(
          [r['epoch'] for r in rows_],
          [r['accuracy'] for r in rows_],
          style,
          markersize=3,
          label=f'{split} top-1',
      )
    ax.set(title=workdir.name, xlabel='epoch', ylabel='accuracy')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / 'curves.png', dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  app.run(main)
