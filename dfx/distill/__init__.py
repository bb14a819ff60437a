"""Manifold distillation: relation losses, the combined KD objective and block feature hooks."""

from dfx.distill.hooks import BlockFeatures, patch_tokens, prefix_tokens_in_blocks
from dfx.distill.losses import distillation_loss, manifold_losses

__all__ = ["BlockFeatures", "distillation_loss", "manifold_losses", "patch_tokens", "prefix_tokens_in_blocks"]
