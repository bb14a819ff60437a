"""Kernels shared by the models, written in plain PyTorch (no compiled extension)."""

from dfx.ops.ms_deform_attn import ms_deform_attn
from dfx.ops.transfer import host_tensor

__all__ = ["host_tensor", "ms_deform_attn"]
