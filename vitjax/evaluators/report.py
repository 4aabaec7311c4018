"""The written report of an evaluation: JSON, PNG figures, a printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vitjax.measure import machine, timing
from vitjax import workdir as workdir_lib
from vitjax.evaluators import plots


def write_report(
    report: dict[str, Any],
    out_dir: Path,
    name: str,
    class_names: tuple[str, ...],
    metrics_jsonl: Path,
) -> Path:
  """Writes the JSON report and its figures; returns the JSON's path."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f'report_{name}.json'
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(report, indent=1))
  tmp.replace(path)
  for split in ('test', 'val'):
    m = report[split]
    title = f'{split}, {name}: balanced accuracy {m["balanced_accuracy"]:.4f}'
    plots.confusion_matrix(
        np.array(m['confusion_matrix']),
        class_names,
        out_dir / f'confusion_{split}.png',
        title,
    )
    plots.per_class_recall(
        m['per_class_recall'],
        class_names,
        out_dir / f'recall_{split}.png',
        title,
    )
  if 'halting_distribution' in report.get('sparsity', {}):
    sp = report['sparsity']
    plots.halting_distribution(
        sp['halting_distribution'],
        out_dir / 'halting.png',
        f'{name}: mean depth {sp["mean_depth_per_token"]:.2f} blocks/token',
    )
  records = workdir_lib.read_records(metrics_jsonl)
  if records:
    plots.training_curves(
        records,
        out_dir / 'curves.png',
        title=f'{report.get("model", "")} {name}',
    )
  return path


def format_table(report: dict[str, Any], class_names: tuple[str, ...]) -> str:
  rows = [f'{"":>20} {"val":>8} {"test":>8}']
  for key in ('accuracy', 'balanced_accuracy', 'worst_class_recall', 'loss'):
    rows.append(
        f'{key:>20} {report["val"][key]:8.4f} {report["test"][key]:8.4f}'
    )
  rows.append('per-class recall / precision (test):')
  t = report['test']
  for i, name in enumerate(class_names):
    rows.append(
        f'{name:>20} {t["per_class_recall"][i]:8.4f} '
        f'{t["per_class_precision"][i]:8.4f}'
    )
  c = report['cost']
  sp = report.get('sparsity', {})
  speed = report.get('speed', {}).get('model')
  if 'teacher' in report:
    t = report['teacher']
    rows.append(
        f'teacher (dense ViT) test balanced accuracy '
        f'{t["test"]["balanced_accuracy"]:.4f}; drop '
        f'{t["test"]["balanced_accuracy"] - report["test"]["balanced_accuracy"]:+.4f}; '
        f'MACs ratio {c["macs_per_image"] / t["cost"]["macs_per_image"]:.3f}'
    )
    if speed:
      ours, theirs = report['precision'], t['precision']
      rows.append(
          f'speed-up of this {ours} model over the {theirs} teacher'
          + ('' if ours == theirs else ' (not the same precision)')
          + ', timed interleaved: '
          + '; '.join(
              f'{at} {format_spread(r, "x")}'
              for at, r in speed['speedup'].items()
          )
      )
  q = report.get('quantization')
  if q:
    line = (
        f'int8 ({q["path"]}, {q["backend"]}): agrees with float on '
        f'{q["test_agreement_with_float"]:.4f} of test images'
    )
    if 'int8_kernel_bytes' in q:
      line += (
          f'; quantized kernels {q["int8_kernel_bytes"]:,} B vs '
          f'{q["float32_kernel_bytes"]:,} B float32 '
          f'({q["int8_kernel_bytes"] / q["float32_kernel_bytes"]:.3f}x)'
          f'; int8 checkpoint {q.get("checkpoint_bytes_on_disk", 0):,} B '
          'on disk'
      )
    rows.append(line)
  if 'mean_depth_per_token' in sp:
    rows.append(
        f'A-ViT: mean depth {sp["mean_depth_per_token"]:.2f} blocks '
        f'per token (class token {sp["mean_depth_cls_token"]:.2f}); '
        f'token removal agrees on {sp["token_removal_agreement"]:.4f} '
        'of images' + _token_removal_speed(speed)
    )
  rows.append(
      f'parameters {c["parameters"]:,}; {c["macs_per_image"] / 1e6:.1f} M '
      'MACs/image'
  )
  if speed:
    rows.append(
        f'{format_spread(speed["images_per_second"], " images/s", 0)} at '
        f'batch {speed["batch"]}; '
        f'{format_spread(speed["latency_ms_batch1"], " ms")} at batch 1 '
        f'(medians of {speed["rounds"]} interleaved rounds on '
        f'{machine.summary(report["machine"])})'
    )
  return '\n'.join(rows)


def _token_removal_speed(speed: dict[str, Any] | None) -> str:
  """A-ViT's token removal against its masked path, timed interleaved."""
  if not speed or 'masked_images_per_second' not in speed:
    return ''
  return (
      f'; token removal {speed["images_per_second"]["median"]:.0f} '
      f'images/s, masked path {speed["masked_images_per_second"]["median"]:.0f}'
      f' ({format_spread(speed["token_removal_over_masked"], "x")})'
  )


def format_spread(spread: dict[str, float], unit: str = '', digits=2) -> str:
  """A timing.Spread's dict as 'median (IQR q25-q75)'."""
  return timing.Spread(**spread).format(unit, digits)


def print_report(report: dict[str, Any], class_names: tuple[str, ...]) -> None:
  print(f'Evaluation of {report["checkpoint"]}:', flush=True)
  print(format_table(report, class_names), flush=True)
