"""Image-to-image translation metrics: L1, PSNR, SSIM, and FID / KID from image features.

Images come as the task's tensors, ``[B, 3, H, W]`` normalised to [-1, 1]. ``L1`` is the mean
absolute difference on that scale (TokenFusion's ``l1_avg_loss``); PSNR and SSIM are computed on
[0, 1] images (``(x + 1) / 2``, data range 1), per image, then averaged over images:

- ``PSNR = 10 log10(1 / MSE)`` (MSE over the image's pixels and channels; an exact copy scores
  :data:`PSNR_CAP` dB instead of infinity);
- ``SSIM`` (Wang et al. 2004): an 11x11 Gaussian window (sigma 1.5) over each channel, ``C1 =
  (0.01)^2``, ``C2 = (0.03)^2``, population (co)variances, only where the window fits in the image
  (no padding), averaged over positions and channels.

FID and KID compare the distributions of two sets of feature vectors (Inception pool features in
the papers): :func:`frechet_distance` and :func:`kernel_inception_distance` (the unbiased MMD^2 with
the cubic polynomial kernel ``(x.y / d + 1)^3``, averaged over subsets; the papers report KID x100).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PSNR_CAP = 100.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clipped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(prediction: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR (dB) of ``[B, C, H, W]`` images on a ``data_range`` scale -> ``[B]``."""
    mse = (prediction.double() - target.double()).pow(2).flatten(1).mean(1)
    value = 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-300))
    return torch.where(mse > 0, value.clamp(max=PSNR_CAP), torch.full_like(value, PSNR_CAP))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalised 1-d Gaussian of ``size`` taps (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(prediction: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM of ``[B, C, H, W]`` images -> ``[B]`` (see the module docstring)."""
    x, y = prediction.double(), target.double()
    channels = x.shape[1]
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {list(x.shape[-2:])}")
    g = gaussian_window().to(x.device)
    rows = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    cols = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(z: Tensor) -> Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(z, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


class TranslationMetrics:
    """Sums over the images seen: L1 (per pixel), PSNR and SSIM (per image); ``summarize`` merges states."""

    def __init__(self):
        self.l1_sum, self.values, self.psnr_sum, self.ssim_sum, self.images = 0.0, 0, 0.0, 0.0, 0

    def add(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``, ``target``: ``[B, 3, H, W]`` on the task's [-1, 1] scale."""
        self.l1_sum += float((prediction.double() - target.double()).abs().sum())
        self.values += target.numel()
        a, b = to_unit(prediction), to_unit(target)
        self.psnr_sum += float(psnr(a, b).sum())
        self.ssim_sum += float(ssim(a, b).sum())
        self.images += target.shape[0]

    def state(self) -> dict:
        return {"l1_sum": self.l1_sum, "values": self.values, "psnr_sum": self.psnr_sum, "ssim_sum": self.ssim_sum,
                "images": self.images}

    @staticmethod
    def summarize(states: list[dict]) -> dict:
        total = {k: sum(s[k] for s in states) for k in states[0]}
        images = max(total["images"], 1)
        return {"L1": total["l1_sum"] / max(total["values"], 1), "PSNR": total["psnr_sum"] / images,
                "SSIM": total["ssim_sum"] / images}


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two sets of feature vectors ``[N, D]``: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)``
    with unbiased covariances."""
    from scipy import linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(root).all():  # a singular product: offset both covariances slightly
        offset = np.eye(s_a.shape[0]) * 1e-6
        root = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> float:
    """KID: the unbiased MMD^2 between two feature sets under ``k(x, y) = (x.y / D + 1)^3``, averaged over
    ``subsets`` random subsets of ``min(subset_size, N_a, N_b)`` vectors drawn from each set."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least two feature vectors in each set")
    rng = np.random.default_rng(seed)
    dim = a.shape[1]
    total = 0.0
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / dim + 1) ** 3, (y @ y.T / dim + 1) ** 3, (x @ y.T / dim + 1) ** 3)
        total += ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(total / subsets)

