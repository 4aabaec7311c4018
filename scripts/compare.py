"""Accuracy against cost for several runs, in float and in int8.

  python scripts/compare.py --out=reports/cpu \
      checkpoints/vit_cpu checkpoints/dynamic_vit_cpu checkpoints/avit_cpu

Each workdir's best checkpoint is evaluated with the config it was trained
with (its config.json) in three precisions, on the test set: float32,
bfloat16 compute (float32 parameters), and int8 (frozen int8 serving with
aqtp; the layers it leaves in float compute in float32). Then
all of them are timed together, interleaved, with speed-ups over the first
workdir's float32 model. Written to --out: report.md (the table, like the
lab report's §6.2, and what each precision computes), report.json,
accuracy_vs_macs.png, per_class_recall.png and curves.png (training curves
side by side).
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
_INT8_ACTIVATIONS = flags.DEFINE_enum(
    'int8_activations',
    'static',
    ['static', 'per_token'],
    "int8 activation scales: 'static' (one per layer, calibrated on "
    "training images) or 'per_token' (per call).",
)
_SPEED_BATCH = flags.DEFINE_integer(
    'speed_batch', 256, 'Batch of the images/s figure.'
)
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Interleaved timing rounds.')
_SECONDS = flags.DEFINE_float(
    'seconds', 0.2, 'Seconds per model per timing round.'
)

PRECISIONS = ('float32', 'bfloat16', 'int8')
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
    'speed-up bs1',
    'speed-up',
    'train time',
)


def _row(report: dict, speed: dict, batch: int) -> dict:
  from vitjax.evaluators import report as report_lib  # pylint: disable=g-import-not-at-top

  c, t = report['cost'], report['test']
  weight_bytes = c['weight_bytes']
  minutes = report['train_seconds'] / 60
  ratio = lambda at: (
      report_lib.format_spread(speed['speedup'][at], 'x')
      if 'speedup' in speed
      else '1 (baseline)'
  )
  return {
      'model': report['label'],
      'precision': report['precision'],
      'balanced test acc.': f'{100 * t["balanced_accuracy"]:.2f}%',
      'top-1': f'{100 * t["accuracy"]:.2f}%',
      'worst class': f'{100 * t["worst_class_recall"]:.1f}%',
      'params': f'{c["parameters"] / 1e6:.2f} M',
      'MMACs/image': f'{c["macs_per_image"] / 1e6:.1f}',
      'weight MB': f'{weight_bytes / 2**20:.2f}',
      'latency bs1 (ms)': f'{speed["latency_ms_batch1"]["median"]:.2f}',
      'images/s': f'{speed["images_per_second"]["median"]:.0f}',
      'speed-up bs1': ratio('batch 1'),
      'speed-up': ratio(f'batch {batch}'),
      'train time': f'{minutes:.1f} min',
  }


def _activation_scales(reports: dict) -> str:
  """What the int8 rows' activation scales are, in words."""
  q = next(r['quantization'] for r in reports.values() if 'quantization' in r)
  if q['activations'] == 'static':
    return (
        'one float32 scale per layer, calibrated on '
        f"{q['calibration_images']} training images and frozen"
    )
  return 'a float32 scale per token, computed per call'


def _norms(reports: dict) -> str:
  """How the int8 rows treat the blocks' LayerNorms, in words."""
  q = next(r['quantization'] for r in reports.values() if 'quantization' in r)
  if q['fold_block_norms']:
    return (
        "LayerNorms (the blocks' scales and biases folded into the int8 "
        'layers they feed)'
    )
  return 'LayerNorms'


def _over(speed: dict, key: str, batch: int) -> str:
  """A speed-up of `speed_report`'s 'speedup_over_<key>', in words."""
  from vitjax.evaluators import report as report_lib  # pylint: disable=g-import-not-at-top

  over = speed[f'speedup_over_{key}']
  return (
      f'{report_lib.format_spread(over[f"batch {batch}"], "x")} at batch '
      f'{batch}, {report_lib.format_spread(over["batch 1"], "x")} at batch 1'
  )


def main(argv):
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from vitjax import evaluate, parallel
  from vitjax.measure import machine
  from vitjax import workdir as workdir_lib
  from vitjax.data import sources
  from vitjax.evaluators import speed

  if _INT8_PATH.value == 'fake' and _INT8_ACTIVATIONS.value == 'static':
    raise app.UsageError(
        '--int8_path=fake simulates per-token scales: add '
        '--int8_activations=per_token.'
    )
  workdirs = [Path(w) for w in argv[1:]]
  if not workdirs:
    raise app.UsageError('name the workdirs to compare.')
  names = [w.name for w in workdirs]
  if len(set(names)) < len(names):
    raise app.UsageError(
        f'the workdirs {names} name their rows: give them distinct names.'
    )
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh()
  reports, predictors = {}, {}
  for workdir in workdirs:
    cfg_path = workdir / 'config.json'
    if not cfg_path.exists():
      raise app.UsageError(f'{workdir} holds no run (no config.json).')
    data = None
    for precision in PRECISIONS:
      config = workdir_lib.saved_config(workdir)
      if _DATA_ROOT.value:
        config.data.root = _DATA_ROOT.value
      if precision == 'int8':
        config.eval.quant, config.eval.quant_path = 'int8', _INT8_PATH.value
        config.eval.quant_activations = _INT8_ACTIVATIONS.value
      else:
        config.model.dtype = precision
      data = data or sources.load(config.data, config.seed)
      logging.info('Evaluating %s in %s', workdir, precision)
      restored = evaluate.restore_predictors(
          config, workdir, 'best', data=data, mesh=mesh
      )
      report = evaluate.evaluate_checkpoint(
          config,
          workdir,
          'best',
          data=data,
          mesh=mesh,
          restored=restored,
          timed=False,
      )
      report['label'] = workdir.name
      name = f'{workdir.name} {precision}'
      reports[name], predictors[name] = report, restored.predictor
  # Every model timed in one sitting, interleaved, against the first one.
  baseline = next(iter(predictors))
  logging.info('Timing %d models interleaved', len(predictors))
  speeds = speed.speed_report(
      predictors,
      mesh,
      data.test.images,
      _SPEED_BATCH.value,
      rounds=_ROUNDS.value,
      seconds=_SECONDS.value,
      baseline=baseline,
      more_baselines={
          # Each model's bfloat16 and int8 against its own float32.
          'own': {
              f'{w.name} {p}': f'{w.name} float32'
              for w in workdirs
              for p in PRECISIONS[1:]
          },
          # The others against the first model in the same precision (in
          # float32 that is the table's speed-up).
          'first': {
              f'{w.name} {p}': f'{workdirs[0].name} {p}'
              for w in workdirs[1:]
              for p in PRECISIONS[1:]
          },
      },
  )
  batch = speeds[baseline]['batch']

  def against(key: str, heading: str) -> list[str]:
    lines = [
        f'- {name}: {_over(speeds[name], key, batch)}'
        for name in speeds
        if f'speedup_over_{key}' in speeds[name]
    ]
    return [heading, *lines, ''] if lines else []

  for name, report in reports.items():
    report['speed'] = {'model': speeds[name]}
  rows = [_row(reports[n], speeds[n], batch) for n in reports]
  header = [
      f'{c} bs{batch}' if c in ('images/s', 'speed-up') else c for c in COLUMNS
  ]
  table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(COLUMNS)]
  table += ['| ' + ' | '.join(r[c] for c in COLUMNS) + ' |' for r in rows]
  first = next(iter(reports.values()))
  text = '\n'.join(
      [
          f'# Accuracy against cost ({machine.summary(first["machine"])})',
          '',
          'Best checkpoint of each run, test set '
          f'({first["test"]["num_images"]:,} images). Every model was timed '
          'in one sitting, interleaved '
          f'({_ROUNDS.value} rounds, vitjax/measure/timing.py): latency at batch 1 '
          f'(over {speed.SINGLE_IMAGES} seeded test images served one at a '
          f'time) and images/s at batch {batch} are medians over the '
          f'rounds, and each speed-up over {baseline} is the median of '
          'per-round ratios with its interquartile range. A-ViT serves '
          'batches through token removal, single images through its '
          'compact path.',
          '',
          *table,
          '',
          *against(
              'own',
              'Against the same model in float32 (per-round ratios, same '
              'sitting):',
          ),
          *against(
              'first',
              f'Against {workdirs[0].name} in the same precision, bfloat16 '
              'and int8 (per-round ratios, same sitting; in float32 it is '
              "the table's speed-up):",
          ),
          'What each precision computes:',
          '- float32: every operation in float32.',
          '- bfloat16: matmuls and convolutions on bfloat16 inputs (with '
          'float32 accumulation on the CPU kernels), softmax, GELU and the '
          'logits in float32; the weights that only these matmuls, '
          'convolutions and embeddings read are held in bfloat16 (cast '
          "once from the float32 checkpoint), LayerNorm's in float32.",
          f"- int8 ({_INT8_PATH.value} path, aqtp): the blocks' q, k, v, "
          'attention-output and MLP Dense layers as int8 x int8 -> int32 '
          'dots (weights: int8 with a float32 scale per output channel, '
          f'frozen; activations: int8 with {_activation_scales(reports)}'
          f'); the patch embedding, {_norms(reports)}, attention '
          "einsums, softmax, GELU, DynamicViT's predictors and the head "
          'in float32, whatever the run trained in (from bfloat16 they '
          'measured slower: vitjax/quant/layers.py'
          + '). weight MB: the bytes of the weights each model serves '
          'with.',
          '',
      ]
  )
  (out / 'report.md').write_text(text)
  (out / 'report.json').write_text(json.dumps(list(reports.values()), indent=1))
  print(text)
  reports = list(reports.values())

  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 5))
  for r in reports:
    marker = {'float32': 'o', 'bfloat16': '^', 'int8': 's'}[r['precision']]
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

  floats = [r for r in reports if r['precision'] == 'float32']
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
    records = workdir_lib.read_records(workdir / 'metrics.jsonl')
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
