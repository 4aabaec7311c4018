"""Shared defaults: every field any config file or command line may set.

Each model's config file starts from `base()` and changes what it needs.
Every field is typed (no `None` defaults), so `--config.x.y=...` can override
any of them and a typo or a wrong type is an error that names the field.

Learning rates: `optim.lr` is the peak rate at `optim.lr_base_batch` images
per step, and every config states it at the batch it runs
(`set_batch_and_lr`), so it runs unscaled. Overriding `train.batch_size`
alone scales the rate linearly; override `optim.lr` with it to choose.
"""

from __future__ import annotations

from ml_collections import ConfigDict

# The course's training profile (images per class, CIFAR-10 class order) and
# its balanced test set; tfds `cifar10` is drawn to these counts.
COURSE_TRAIN_PROFILE = (
    4435,
    4189,
    3065,
    4191,
    4513,
    3717,
    3513,
    3249,
    2685,
    2023,
)
COURSE_TEST_PER_CLASS = 487

# Where each preset's ViT run lives by default: the sparse models start
# from it (sparse.init_from), as the documented commands train it.
DENSE_WORKDIRS = {
    '': 'checkpoints/vit',
    'cpu': 'checkpoints/vit_cpu',
    'smoke': 'checkpoints/vit_smoke',
}

# Model sizes by name. `seed` is the course's own ViT, kept for comparison.
VARIANTS = {
    # name: (patch_size, hidden_dim, depth, num_heads, mlp_ratio)
    'seed': (8, 384, 6, 6, 4.0),
    'small/4': (4, 256, 8, 4, 4.0),  # the GPU recipe's
    'micro/4': (4, 128, 4, 4, 2.0),  # the CPU sprint's
    'nano/4': (4, 32, 2, 2, 2.0),  # tests only
}


def base() -> ConfigDict:
  """The full set of fields, with the defaults of the main GPU recipe."""
  c = ConfigDict()
  c.seed = 0

  # Data section.
  c.data = ConfigDict()
  c.data.source = 'folder'  # 'folder': course layout under root; 'tfds'
  c.data.root = './data'
  c.data.train_dir = 'CIFAR10_imbalanced/CIFAR10_unbalance'
  c.data.test_dir = 'CIFAR10_balanced/CIFAR10_balance'
  c.data.cache_dir = '~/.cache/vitjax'  # decoded arrays, keyed by file list
  c.data.train_profile = COURSE_TRAIN_PROFILE  # source='tfds' only
  c.data.test_per_class = COURSE_TEST_PER_CLASS  # source='tfds' only
  c.data.val_fraction = 0.1  # stratified, seeded, from the training folders
  # 'natural' | 'balanced' | 'sqrt'. Class weights and logit adjustment
  # follow the distribution it draws (uniform when balanced: no double
  # correction).
  c.data.sampling = 'natural'
  c.data.pipeline = 'tf'  # 'tf' (tf.data on the host) | 'device' (JAX)
  c.data.log_sampled_images = 4096  # class counts of the first N sampled

  # Augmentation section (crop and flip are the course's).
  c.aug = ConfigDict()
  c.aug.crop_padding = 4  # 0 disables the random crop
  c.aug.flip = True
  c.aug.randaugment_layers = 2  # 0 disables RandAugment
  c.aug.randaugment_magnitude = 9.0  # 0..10
  c.aug.mixup_alpha = 0.8  # 0 disables mixup
  c.aug.cutmix_alpha = 1.0  # 0 disables cutmix
  c.aug.mix_prob = 1.0  # share of batches mixed (mixup or cutmix, 50/50)
  c.aug.label_smoothing = 0.1

  # Model section: sizes from VARIANTS (apply_variant), 'small/4' here.
  c.model = ConfigDict()
  c.model.name = 'vit'  # 'vit' | 'dynamic_vit' | 'avit'
  apply_variant(c, 'small/4')
  c.model.stem = 'conv'  # 'patch' (strided conv) | 'conv' (3x3 convs first)
  c.model.dropout = 0.0
  c.model.attention_dropout = 0.0
  # PatchDropout: the share of patch tokens each training image drops (ViT
  # only; evaluation sees them all).
  c.model.patch_dropout = 0.0
  c.model.drop_path = 0.1
  # Compute dtype ('float32' | 'bfloat16' | 'auto': bfloat16 where the
  # machine computes it natively); parameters stay float32.
  c.model.dtype = 'float32'
  # 'auto': the hand-written XLA:CPU kernels on CPUs, the libraries' own
  # elsewhere; 'cpu' or 'xla' to choose (vitjax/models/vit.py, ViT.kernels).
  c.model.kernels = 'auto'

  # Loss section: a base loss, optional class weights, optional delay.
  c.loss = ConfigDict()
  c.loss.name = 'ce'  # 'ce' | 'focal' | 'logit_adjusted'
  c.loss.class_weights = 'none'  # 'none' | 'inverse' | 'effective'
  c.loss.effective_beta = 0.9999  # Cui et al. 2019
  c.loss.reweight_from_epoch = 0.0  # > 0: deferred re-weighting (DRW)
  c.loss.focal_gamma = 2.0
  c.loss.logit_adjust_tau = 1.0

  # Optimizer section (AdamW, warmup then cosine).
  c.optim = ConfigDict()
  c.optim.lr = 1e-3  # peak, at lr_base_batch (see the module docstring)
  c.optim.lr_base_batch = 512
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 5.0
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 1.0  # 0 disables
  c.optim.ema_decay = 0.0  # 0 disables the EMA of the weights

  # Training section.
  c.train = ConfigDict()
  c.train.batch_size = 512  # global, over all devices and hosts
  # The schedule's length: `epochs` (an epoch = the training split's size in
  # images), unless time_budget_minutes > 0. Then the budget is a deadline
  # for the whole command, from its start to the final report written: the
  # steps that fit are measured, and re-planned as the run goes, so the
  # step count depends on the machine and its load (vitjax/time_budget.py);
  # `epochs` only sizes the schedule of the throwaway steps timed at start.
  c.train.epochs = 200.0
  c.train.time_budget_minutes = 0.0
  c.train.log_every_steps = 50
  c.train.eval_every_epochs = 5.0  # validation, latest and best checkpoints
  c.train.keep_checkpoints = 2  # latest ones kept (plus the best)
  # A workdir to continue from at a first start: its latest checkpoint
  # (weights, optimizer state, step) under this config, e.g. a lower
  # learning rate after a divergence. The split must be the same.
  c.train.resume_from = ''
  # False: stop after training, without evaluating the test set: for recipe
  # trials, which are compared on validation (metrics.jsonl's
  # val/best_balanced_accuracy); the test set is for final configs.
  c.train.final_evaluation = True
  # True: one process per host joins jax.distributed (vitjax/parallel.py).
  c.train.distributed = False

  # Evaluation section.
  c.eval = ConfigDict()
  c.eval.batch_size = 512
  c.eval.checkpoint = 'best'  # 'best' | 'latest' | a step number
  c.eval.use_ema = True  # evaluate the EMA weights when they exist
  c.eval.speed_batch = 256  # batch of the images/s figure; batch 1 is timed too
  # Speed is timed interleaved with what it is compared with
  # (vitjax/measure/timing.py): `speed_rounds` rounds, each running every candidate for
  # about `speed_seconds`; figures are medians over the rounds.
  c.eval.speed_rounds = 10
  c.eval.speed_seconds = 0.1
  c.eval.quant = 'none'  # 'int8': evaluate in int8 (vitjax/quant)
  c.eval.quant_path = 'serve'  # 'serve' (frozen int8) | 'fake' (quant-dequant)
  c.eval.quant_backend = 'aqt'  # 'aqt' (aqtp) | 'fallback' (hand-written)
  c.eval.quant_head = False  # also quantize the classifier head
  c.eval.quant_attention = False  # also quantize the attention einsums
  # Activation scales: 'static' (one per layer, calibrated on training
  # images; serve path only) or 'per_token' (computed per call). Static
  # was chosen on validation: within 0.18 points of per-token on the CPU
  # runs, and faster (docs/int8.md).
  c.eval.quant_activations = 'static'
  c.eval.quant_calibration_images = 1024  # for 'static': how many, seeded
  # Fold the blocks' LayerNorm scales and biases into the layers they feed
  # before quantizing (vitjax/quant/norm_folding.py): XLA:CPU then keeps
  # those layers' input quantization on one thread (docs/int8.md).
  c.eval.quant_fold_norms = True
  return c


def set_batch_and_lr(c: ConfigDict, batch_size: int, lr: float) -> None:
  """The batch a config runs and its peak learning rate at that batch."""
  c.train.batch_size = batch_size
  c.optim.lr = lr
  c.optim.lr_base_batch = batch_size


def apply_variant(c: ConfigDict, name: str) -> ConfigDict:
  """Writes a named size into c.model's size fields (see VARIANTS).

  Variants are chosen by config argument, before command-line overrides,
  so `--config.model.depth=6` still wins over the variant's depth.
  """
  if name not in VARIANTS:
    raise ValueError(
        f'model variant {name!r}: expected one of {sorted(VARIANTS)}.'
    )
  p, d, depth, heads, mlp = VARIANTS[name]
  c.model.patch_size, c.model.hidden_dim, c.model.depth = p, d, depth
  c.model.num_heads, c.model.mlp_ratio = heads, mlp
  return c


def parse_arg(arg: str | None, presets: tuple[str, ...]) -> str:
  """Checks a config argument (`file.py:name`) against the known presets."""
  arg = arg or ''
  if arg not in presets:
    raise ValueError(
        f'config argument {arg!r}: expected one of '
        f'{sorted(k or "<none>" for k in presets)}.'
    )
  return arg
