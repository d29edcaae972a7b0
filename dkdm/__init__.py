"""dkdm: data-free knowledge distillation for diffusion models with any architecture."""

__version__ = "0.1.0"
