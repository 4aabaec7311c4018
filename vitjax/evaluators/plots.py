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


# Figures of the models' per-patch decisions (vitjax/evaluators/decisions.py).
# Images come class by class; each row holds one class's images.


def grey_out(images: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """Images [b, h, w, 3] uint8 with the patches where keep [b, g, g] is
  False blended to light grey (what DynamicViT dropped)."""
  b, h, w, _ = images.shape
  g = keep.shape[-1]
  pixels = np.repeat(np.repeat(keep, h // g, axis=1), w // g, axis=2)
  grey = 0.25 * images.astype(np.float32) + 0.75 * 200.0
  return np.where(pixels[..., None], images, grey.astype(np.uint8))


def _decision_grid(
    labels, panels_per_image: int, side_column: bool = False
) -> tuple[plt.Figure, list[list[plt.Axes]], int, dict[str, plt.Axes]]:
  """A figure with one row per class and panels_per_image panels for each
  of its images: axes[i // per_row][(i % per_row) * panels_per_image + j]
  is image i's j-th panel. side_column adds a tall axes on the right
  ('side') and a colour bar's row under the images ('colorbar')."""
  rows = len(np.unique(labels))
  per_row = len(labels) // rows
  cols = per_row * panels_per_image
  widths = [1.0] * cols + ([2.5] if side_column else [])
  heights = [1.0] * rows + ([0.15] if side_column else [])
  fig = plt.figure(figsize=(1.15 * sum(widths) + 0.4, 1.2 * sum(heights) + 0.6))
  spec = fig.add_gridspec(
      len(heights), len(widths), width_ratios=widths, height_ratios=heights
  )
  axes = [
      [fig.add_subplot(spec[r, c]) for c in range(cols)] for r in range(rows)
  ]
  for row in axes:
    for ax in row:
      ax.set_xticks([])
      ax.set_yticks([])
  extra = {}
  if side_column:
    extra['side'] = fig.add_subplot(spec[:rows, -1])
    extra['colorbar'] = fig.add_subplot(spec[rows, :cols])
  return fig, axes, per_row, extra


def _images_with_panels(axes, per_row, images, labels, predicted, names):
  """Draws each image in its first panel, titled with its class (true→
  predicted in red where the model is wrong); yields (i, image, the
  image's other panels)."""
  panels = len(axes[0]) // per_row
  for i, image in enumerate(images):
    row = axes[i // per_row]
    first = (i % per_row) * panels
    row[first].imshow(image, interpolation='nearest')
    right = labels[i] == predicted[i]
    row[first].set_title(
        names[labels[i]]
        if right
        else f'{names[labels[i]]}→{names[predicted[i]]}',
        fontsize=7,
        color='black' if right else 'tab:red',
    )
    yield i, image, row[first + 1 : first + panels]


def _overlay(ax, image, values, **imshow_args):
  """values [g, g] drawn over the image, stretched to its pixels."""
  h, w = image.shape[:2]
  ax.imshow(image, interpolation='nearest')
  return ax.imshow(values, extent=(-0.5, w - 0.5, h - 0.5, -0.5), **imshow_args)


def _save(fig, title: str, out: Path) -> None:
  fig.suptitle(
      f'{title}\nred titles: true→predicted class, where the model is wrong',
      fontsize=8,
  )
  fig.tight_layout()
  fig.savefig(out, dpi=72)
  plt.close(fig)


def kept_tokens(
    images, kept, stage_blocks, labels, predicted, class_names, out: Path
) -> None:
  """The image, then per pruning stage the patches it keeps."""
  fig, axes, per_row, _ = _decision_grid(labels, 1 + len(kept))
  for i, image, panels in _images_with_panels(
      axes, per_row, images, labels, predicted, class_names
  ):
    for s, ax in enumerate(panels):
      ax.imshow(
          grey_out(image[None], kept[s, i : i + 1])[0],
          interpolation='nearest',
      )
      ax.set_title(
          f'from block {stage_blocks[s]}: {int(kept[s, i].sum())}',
          fontsize=6,
      )
  _save(
      fig,
      'DynamicViT: the patches each pruning stage keeps (grey: dropped)',
      out,
  )


def halting_depth(
    images,
    depth,
    max_depth,
    mean_depth_per_class,
    labels,
    predicted,
    class_names,
    out: Path,
) -> None:
  """Each image beside its patches coloured by blocks run, and the mean
  depth per class over the test set."""
  fig, axes, per_row, extra = _decision_grid(labels, 2, side_column=True)
  for i, image, (ax,) in _images_with_panels(
      axes, per_row, images, labels, predicted, class_names
  ):
    shown = _overlay(
        ax,
        image,
        depth[i],
        cmap='magma',
        vmin=1,
        vmax=max_depth,
        alpha=0.7,
        interpolation='nearest',
    )
    ax.set_title(f'mean {depth[i].mean():.2f}', fontsize=6)
  ax = extra['side']
  if mean_depth_per_class is not None:
    ax.barh(range(len(class_names)), mean_depth_per_class, color='tab:purple')
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    # Top to bottom, one bar beside each row of images.
    ax.set_ylim(len(class_names) - 0.5, -0.5)
    lo = min(mean_depth_per_class)
    ax.set_xlim(max(0.0, lo - 0.5), max_depth)
    ax.set_title('mean blocks per patch,\nwhole test set', fontsize=7)
    ax.tick_params(axis='x', labelsize=7)
    ax.grid(axis='x', alpha=0.3)
  else:
    ax.set_axis_off()
  fig.colorbar(
      shown,
      cax=extra['colorbar'],
      orientation='horizontal',
      label='blocks run before halting',
  )
  _save(fig, 'A-ViT: the blocks each patch runs before it halts', out)


def attention_rollout(
    images, rollout, labels, predicted, class_names, out: Path
) -> None:
  """Each image beside the class token's attention rollout over it."""
  fig, axes, per_row, _ = _decision_grid(labels, 2)
  for i, image, (ax,) in _images_with_panels(
      axes, per_row, images, labels, predicted, class_names
  ):
    _overlay(
        ax,
        image,
        rollout[i] / rollout[i].max(),
        cmap='jet',
        alpha=0.5,
        interpolation='bilinear',
    )
  _save(
      fig,
      'ViT: attention rollout of the class token\n(Abnar & Zuidema 2020)',
      out,
  )
