"""ferret_fl: the reference federated fine-tuning application built on ferret_kernels."""

__version__ = "0.1.0"
