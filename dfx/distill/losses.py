"""Manifold distillation losses (patch / sample / random relations) and the full training loss.

Shapes used throughout:
    B  batch size, N  patch tokens per image (extra tokens already dropped),
    Cs / Ct  student / teacher width (may differ), K  number of classes.

A relation matrix compares L2-normalised token features with each other (cosine similarities),
so student and teacher can have different widths: only the token-by-token relations are matched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["manifold_losses", "distillation_loss"]

KD_MODES = ("soft", "hard")


def _check_features(f_s: Tensor, f_t: Tensor) -> None:
    for name, f in (("f_s", f_s), ("f_t", f_t)):
        if not isinstance(f, Tensor) or f.dim() != 3:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{name} must be a 3-D tensor [B, N, C], got {shape}")
        if not f.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {f.dtype}")
    if f_s.shape[:2] != f_t.shape[:2]:
        raise ValueError(
            f"f_s and f_t must have the same batch size and token count [B, N, *], "
            f"got f_s {tuple(f_s.shape)} and f_t {tuple(f_t.shape)}"
        )


def _relation_mse(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Mean squared difference of the relation matrices of [G, M, C] groups -> scalar.

    Each group g gives an M x M relation f[g] f[g]^T; the mean runs over all G*M*M entries.
    """
    relation_s = f_s @ f_s.transpose(-1, -2)
    relation_t = f_t @ f_t.transpose(-1, -2)
    return F.mse_loss(relation_s, relation_t)


def manifold_losses(f_s: Tensor, f_t: Tensor, k: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Patch, sample and random relation losses between one student and one teacher layer.

    Args:
        f_s: student patch tokens [B, N, Cs].
        f_t: teacher patch tokens [B, N, Ct]; no gradient flows into them.
        k: number of tokens drawn (without replacement) from the B*N tokens for the random
            relation; clipped to B*N.
        generator: torch.Generator for the random token draw (reproducible runs); its device
            decides where the permutation is drawn.

    Returns:
        {"patch", "sample", "rand"}: unweighted float32 (or float64 for float64 inputs) scalars.
        patch  = mean over images b of mean((R_t[b] - R_s[b])^2), R[b] = F^[b] F^[b]^T  (N x N);
        sample = the same over token positions n, R[n] relates the B images at position n (B x B);
        rand   = the same for one K x K relation of K tokens picked from the flattened batch,
                 the same tokens for student and teacher.
    """
    _check_features(f_s, f_t)
    return _stacked_relation_losses(f_s[None], f_t[None], k, generator)


def _stacked_relation_losses(f_s: Tensor, f_t: Tensor, k: int, generator: torch.Generator | None) -> dict[str, Tensor]:
    """:func:`manifold_losses` for L layer pairs at once: f_s [L, B, N, Cs], f_t [L, B, N, Ct].

    Returns each term's mean over the L pairs. Equal to averaging L separate calls (the random
    tokens are drawn layer by layer from ``generator`` in the same order), but with one batched
    matmul per relation instead of L: at distillation sizes the cost is per operation, not per FLOP.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (tokens for the random relation), got {k!r}")
    layers, batch, tokens = f_s.shape[:3]

    # Relations of unit vectors are small differences of sums of many products: bfloat16/float16
    # would drown them in rounding, so compute in (at least) float32 with autocast switched off.
    dtype = torch.promote_types(torch.promote_types(f_s.dtype, f_t.dtype), torch.float32)
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        student = F.normalize(f_s.to(dtype), dim=-1)
        teacher = F.normalize(f_t.detach().to(dtype), dim=-1)

        patch = _relation_mse(student.flatten(0, 1), teacher.flatten(0, 1))
        sample = _relation_mse(student.transpose(1, 2).flatten(0, 1), teacher.transpose(1, 2).flatten(0, 1))

        # Draw on the generator's device (randperm requires it), then move to the features.
        draw_device = generator.device if generator is not None else f_s.device
        picked = torch.stack([torch.randperm(batch * tokens, generator=generator, device=draw_device)[:k]
                              for _ in range(layers)]).to(f_s.device)
        rows = torch.arange(layers, device=f_s.device)[:, None]
        rand = _relation_mse(student.flatten(1, 2)[rows, picked], teacher.flatten(1, 2)[rows, picked])
    return {"patch": patch, "sample": sample, "rand": rand}


def _at_least_float32(x: Tensor) -> Tensor:
    """Half-precision tensors (AMP) to float32; float32 / float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_hyperparameters(alpha: float, beta: float, weights: dict[str, float], tau: float, kd: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (share of KD against CE), got {alpha!r}")
    for name, value in {"beta": beta, **weights}.items():
        if value < 0.0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if tau <= 0.0:
        raise ValueError(f"tau must be > 0 (KD temperature), got {tau!r}")
    if kd not in KD_MODES:
        raise ValueError(f"kd must be one of {KD_MODES}, got {kd!r}")


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """CE for class indices [B] or soft (mixup/cutmix) distributions [B, K], mean over the batch."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target)
    if target.shape != logits.shape:
        raise ValueError(
            f"target must be class indices [B] or a distribution [B, K] shaped like the logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    # cross_entropy with probability targets is sum_k -target_k * log_softmax_k, mean over B.
    return F.cross_entropy(logits, target.to(logits.dtype))


def distillation_loss(
    student_logits: Tensor | tuple[Tensor, Tensor],
    teacher_logits: Tensor,
    target: Tensor,
    student_feats: list[Tensor],
    teacher_feats: list[Tensor],
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    w_sample: float = 0.1,
    w_patch: float = 4.0,
    w_rand: float = 0.2,
    k: int = 192,
    tau: float = 1.0,
    kd: str = "soft",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Manifold distillation objective (defaults: the paper's DeiT-Ti <- CaiT-S24 recipe).

        total = (1 - alpha) * CE(student, target) + alpha * KD(student, teacher)
                + beta * mean over layer pairs of (w_sample * sample + w_patch * patch + w_rand * rand)

    Args:
        student_logits: [B, K], or a tuple (cls_logits, dist_logits) of two [B, K] tensors for a
            student with a distillation token. DeiT's convention (timm `VisionTransformerDistilled`
            after `set_distilled_training(True)`, in train mode, returns this tuple): the class head
            is trained on the labels (CE) and the distillation head on the teacher (KD); at
            inference the two heads' logits are averaged. DeiT's own hard distillation is
            alpha=0.5, kd="hard", beta=0.
        teacher_logits: [B, K]; detached here.
        target: class indices [B] (long) or soft target distributions [B, K] (mixup / cutmix).
        student_feats, teacher_feats: equally long lists of paired layers' patch tokens
            [B, N, Cs] / [B, N, Ct] (extra tokens dropped, see `dfx.distill.patch_tokens`).
            Empty lists give zero manifold terms.
        alpha: KD share in [0, 1]; beta, w_*: manifold weights >= 0; k: tokens of the random
            relation; tau: KD temperature > 0 (soft KD is scaled by tau^2 so its gradients keep
            their size across temperatures); kd: "soft" (KL at temperature tau) or "hard" (CE to
            the teacher's argmax); generator: for the random token draws.

    Returns:
        (total scalar, {"ce", "kd", "patch", "sample", "rand", "manifold"} detached scalars), where
        patch / sample / rand are the unweighted means over layer pairs and manifold is the
        weighted sum before beta.
    """
    _check_hyperparameters(alpha, beta, {"w_sample": w_sample, "w_patch": w_patch, "w_rand": w_rand}, tau, kd)
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"student_feats and teacher_feats must pair up layer by layer, got "
            f"{len(student_feats)} and {len(teacher_feats)} layers"
        )

    cls_logits, dist_logits = student_logits if isinstance(student_logits, tuple) else (student_logits,) * 2
    # Cross-entropies and KL in float32: under AMP the logits arrive in half precision.
    cls_logits, dist_logits = _at_least_float32(cls_logits), _at_least_float32(dist_logits)
    teacher_logits = _at_least_float32(teacher_logits.detach())
    if dist_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape [B, K], got "
            f"{tuple(dist_logits.shape)} and {tuple(teacher_logits.shape)}"
        )

    ce = _cross_entropy(cls_logits, target)
    if kd == "soft":
        kd_loss = F.kl_div(
            F.log_softmax(dist_logits / tau, dim=-1),
            F.log_softmax(teacher_logits / tau, dim=-1),
            reduction="batchmean",
            log_target=True,
        ) * (tau * tau)
    else:
        kd_loss = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))

    if not student_feats:
        relation_terms = {name: ce.new_zeros(()) for name in ("patch", "sample", "rand")}
    else:
        for f_s, f_t in zip(student_feats, teacher_feats):
            _check_features(f_s, f_t)
        if len({f.shape for f in student_feats}) == 1 and len({f.shape for f in teacher_feats}) == 1:
            relation_terms = _stacked_relation_losses(torch.stack(student_feats), torch.stack(teacher_feats), k,
                                                      generator)
        else:  # layers of different widths (e.g. a hierarchical student): one pair at a time
            per_layer = [manifold_losses(f_s, f_t, k, generator) for f_s, f_t in zip(student_feats, teacher_feats)]
            relation_terms = {name: torch.stack([p[name] for p in per_layer]).mean() for name in per_layer[0]}
    manifold = (
        w_sample * relation_terms["sample"] + w_patch * relation_terms["patch"] + w_rand * relation_terms["rand"]
    )

    total = (1.0 - alpha) * ce + alpha * kd_loss + beta * manifold
    parts = {"ce": ce, "kd": kd_loss, **relation_terms, "manifold": manifold}
    return total, {name: value.detach() for name, value in parts.items()}
