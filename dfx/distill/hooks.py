"""Collect intermediate block outputs of a timm ViT / DeiT / CaiT with forward hooks.

    with BlockFeatures(student, [0, 1, 2, 3, 8, 9, 10, 11]) as student_blocks:
        logits = student(images)
        feats = patch_tokens(student_blocks.pop(), student_blocks.num_prefix_tokens)  # [B, N, C] each

The hooks see each block's output [B, T, C] (T = extra tokens + N patch tokens), after the block
and before the model's final norm. Outputs are kept as they are (not detached), so a student's
features carry gradients; detaching a teacher's is the loss's job.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["BlockFeatures", "patch_tokens", "prefix_tokens_in_blocks"]


def prefix_tokens_in_blocks(model: nn.Module) -> int:
    """Extra (class / distillation / register) tokens in front of the patch tokens in `model.blocks`.

    timm's `num_prefix_tokens` (1 for ViT/DeiT, 2 for distilled DeiT, + registers). CaiT adds its
    class token only in the class-attention blocks (`blocks_token_only`), so its patch blocks
    carry none although its `num_prefix_tokens` is 1.
    """
    if getattr(model, "blocks_token_only", None) is not None:
        return 0
    return int(getattr(model, "num_prefix_tokens", 0))


def patch_tokens(feats: Tensor | Sequence[Tensor], num_prefix_tokens: int) -> Tensor | list[Tensor]:
    """Drop the leading extra tokens: [B, T, C] -> [B, T - num_prefix_tokens, C] (or a list of such)."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an integer >= 0, got {num_prefix_tokens!r}")
    if isinstance(feats, Tensor):
        return feats[:, num_prefix_tokens:]
    return [f[:, num_prefix_tokens:] for f in feats]


class BlockFeatures:
    """Forward hooks on `model.blocks[i]` for i in `layers`; `.pop()` returns their latest outputs.

    Use as a context manager (hooks removed on exit) or call `.remove()`. Each forward overwrites
    the stored outputs; `.pop()` returns them in `layers` order ([B, T, C] each) and clears them.
    For CaiT only the patch blocks (`model.blocks`) are hooked, never `blocks_token_only`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int]):
        blocks = getattr(model, "blocks", None)
        model_name = type(model).__name__
        if not isinstance(blocks, nn.Sequential | nn.ModuleList):
            raise ValueError(f"model {model_name} has no `blocks` sequence of transformer blocks to hook")
        if len(layers) == 0:
            raise ValueError(f"layers must name at least one block of {model_name}, got {list(layers)}")
        for index in layers:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(blocks):
                raise ValueError(
                    f"layer index {index!r} is out of range for {model_name} with {len(blocks)} blocks: "
                    f"valid indices are 0..{len(blocks) - 1}"
                )
        self.layers = list(layers)
        self.num_prefix_tokens = prefix_tokens_in_blocks(model)
        self._outputs: dict[int, Tensor] = {}
        # One hook per distinct block, even when a block is listed twice.
        self._handles = [blocks[index].register_forward_hook(self._hook(index)) for index in dict.fromkeys(layers)]

    def _hook(self, index: int):
        def store(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self._outputs[index] = output

        return store

    def pop(self) -> list[Tensor]:
        """Outputs of the hooked blocks from the last forward, in `layers` order; clears them."""
        missing = [index for index in self.layers if index not in self._outputs]
        if missing:
            raise RuntimeError(f"no features collected for blocks {missing}: run a forward pass before pop()")
        feats = [self._outputs[index] for index in self.layers]
        self._outputs.clear()
        return feats

    def remove(self) -> None:
        """Remove the hooks and drop any stored outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def __enter__(self) -> "BlockFeatures":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
