"""vitjax: Vision Transformers on class-imbalanced CIFAR-10 in JAX/Flax."""

# A workdir records the version that wrote it; another minor version
# refuses it (vitjax/workdir.py).
__version__ = '0.2.0'
