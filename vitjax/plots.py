"""PNG figures of a run: training curves, confusion matrix, per-class recall."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def training_curves(records: list[dict], out: Path, title: str = '') -> None:
  """Loss and accuracy against epoch, training windows and validation."""
  train = [r for r in records if r.get('split') == 'train']
  val = [r for r in records if r.get('split') == 'val']
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for rows, name, style in ((train, 'train', '-'), (val, 'val', 'o-')):
    if not rows:
      continue
    epochs = [r['epoch'] for r in rows]
    ax_loss.plot(
        epochs, [r['loss'] for r in rows], style, label=name, markersize=3
    )
    ax_acc.plot(
        epochs,
        [r['accuracy'] for r in rows],
        style,
        label=f'{name} top-1',
        markersize=3,
    )
  if val:
    ax_acc.plot(
        [r['epoch'] for r in val],
        [r['balanced_accuracy'] for r in val],
        's--',
        label='val balanced',
        markersize=3,
    )
  ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
  ax_acc.set(xlabel='epoch', ylabel='accuracy', title='accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def confusion_matrix(
    cm: np.ndarray, names: Sequence[str], out: Path, title: str
) -> None:
  cm = np.asarray(cm)
  rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(7, 6))
  im = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right')
  ax.set_yticks(range(len(names)), names)
  for i in range(len(names)):
    for j in range(len(names)):
      ax.text(
          j,
          i,
          str(cm[i, j]),
          ha='center',
          va='center',
          fontsize=7,
          color='white' if rates[i, j] > 0.5 else 'black',
      )
  ax.set(xlabel='predicted', ylabel='true', title=title)
  fig.colorbar(im, ax=ax, label='share of the true class')
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def per_class_recall(
    recall: Sequence[float], names: Sequence[str], out: Path, title: str
) -> None:
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.bar(range(len(names)), recall, color='tab:blue')
  ax.axhline(
      float(np.mean(recall)),
      color='tab:red',
      linestyle='--',
      label=f'balanced accuracy {np.mean(recall):.3f}',
  )
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right')
  ax.set(ylim=(0, 1), ylabel='recall', title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def halting_distribution(
    shares: Sequence[float], out: Path, title: str
) -> None:
  """Share of tokens that halt at each block (A-ViT)."""
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.bar(range(1, len(shares) + 1), shares, color='tab:green')
  ax.set(
      xlabel='block at which the token halts',
      ylabel='share of tokens',
      title=title,
  )
  ax.set_xticks(range(1, len(shares) + 1))
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
