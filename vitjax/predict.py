"""Classifies your own images with a trained run.

  python -m vitjax.predict --workdir=checkpoints/vit_cpu cat.jpg photos/
  python -m vitjax.predict --workdir=checkpoints/vit_cpu --int8 --json photos/
  python -m vitjax.predict --workdir=checkpoints/vit_cpu --export=vit.jax

Arguments are image files and folders (searched recursively). Each image is
turned upright by its EXIF orientation, converted to RGB (transparency
over white) and the whole of it resized to 32x32 pixels (Pillow's
antialiased bicubic filter), the size of the training images: crop a photo
first if the object fills only part of it. The model, its config and class
names come from the workdir (vitjax/serving.py); the checkpoint is the best
one unless --checkpoint names another. Printed: the top classes of each
image with their probabilities, or with --json one JSON document. A file
that does not decode as an image, whatever the reason, is named on stderr
and skipped; the others are still classified (exit status 2 if none is an
image).

--export writes the served function, weights included, as a jax.export
artifact (and FILE.json: its class names and what it serves), which runs
with jax alone: jax.export.deserialize(open(FILE, 'rb').read()).call(x),
x uint8 [batch, 32, 32, 3] -> class probabilities [batch, classes]. (A-ViT
exports its masked path: the same predictions, no token skipped.)
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained run.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', 'best', "'best', 'latest' or a step number."
)
_INT8 = flags.DEFINE_bool(
    'int8', False, 'Serve the frozen int8 model (vitjax/quant).'
)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON document.')
_TOP = flags.DEFINE_integer('top', 3, 'Classes printed per image.')
_EXPORT = flags.DEFINE_string(
    'export', '', 'Also write the served function here (jax.export).'
)
_BATCH = 256  # images per forward pass
flags.mark_flag_as_required('workdir')


def _fail(message: str) -> None:
  print(f'vitjax: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv):
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from vitjax import checkpoint, errors, serving

  if _TOP.value < 1:
    _fail(f'--top={_TOP.value}: expected at least 1.')
  if _EXPORT.value and os.path.isdir(_EXPORT.value):
    _fail(
        f'--export={_EXPORT.value}: is a folder; name the file to write,'
        f' e.g. --export={os.path.join(_EXPORT.value, "model.jax")}.'
    )
  try:
    # Checked before the model loads, and named as this command's flag.
    which = checkpoint.parse_which(_CHECKPOINT.value, '--checkpoint')
    files = serving.image_files(argv[1:])
    if not files and not _EXPORT.value:
      _fail(
          'no files to classify'
          + (f' in {" ".join(argv[1:])}' if argv[1:] else '')
          + ': name image files or folders.'
      )
    served = serving.load(_WORKDIR.value, which, _INT8.value)
  except errors.UserError as e:
    _fail(str(e))
  if _EXPORT.value:
    try:
      path = serving.export(served, _EXPORT.value)
    except OSError as e:  # a folder on the way that is a file, no permission
      _fail(f'--export={_EXPORT.value}: {e.strerror or e}.')
    print(f'Wrote {path} and {path}.json', file=sys.stderr)
    if not files:
      return
  images, kept, skipped = [], [], []
  for f in files:
    image = serving.read_image(f)
    if isinstance(image, str):
      skipped.append({'file': str(f), 'error': image})
      print(f'vitjax: skipped {f}: {image}', file=sys.stderr, flush=True)
    else:
      images.append(image)
      kept.append(f)
  probs = np.concatenate(
      [
          served.probabilities(np.stack(images[i : i + _BATCH]))
          for i in range(0, len(images), _BATCH)
      ]
      or [np.zeros((0, len(served.class_names)))]
  )
  names, top = served.class_names, min(_TOP.value, len(served.class_names))
  predictions = []
  for f, p in zip(kept, probs):
    best = np.argsort(-p, kind='stable')[:top]
    predictions.append(
        {
            'file': str(f),
            'top': [
                {'class': names[c], 'probability': float(p[c])} for c in best
            ],
        }
    )
  if _JSON.value:
    document = {
        'served': served.description,
        'predictions': predictions,
        'skipped': skipped,
    }
    print(json.dumps(document, indent=1))
  else:
    for pred in predictions:
      top_text = ', '.join(
          f'{t["class"]} {t["probability"]:.3f}' for t in pred['top']
      )
      print(f'{pred["file"]}: {top_text}')
  if not predictions:
    _fail('none of the files is an image.')


if __name__ == '__main__':
  app.run(main)
