"""jaxreid: fully unsupervised person re-identification in JAX/Flax.

Importing it changes nothing in the process: the entry points apply the
process-wide XLA and malloc settings with `jaxreid.host.configure_host()`."""

__version__ = "0.1.0"
