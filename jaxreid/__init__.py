"""jaxreid: fully unsupervised person re-identification in JAX/Flax."""

__version__ = "0.1.0"
