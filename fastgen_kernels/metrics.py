r"""The Frechet distance between two feature sets, as in FID, in plain PyTorch (no scipy).

Each feature set (N, F) is summarized by a Gaussian N(mu, C): its mean and unbiased covariance.
The squared 2-Wasserstein (Frechet) distance between two Gaussians is

    d^2 = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2}).

FID implementations usually take sqrtm(C1 C2) of the non-symmetric product, which has complex
round-off and needs scipy. Here both square roots are of symmetric positive semi-definite matrices,
taken with symmetric eigendecompositions (``torch.linalg.eigh``) in float64: C1 = V diag(w) V^T
gives C1^{1/2} = V diag(sqrt w) V^T, and tr(M^{1/2}) = sum_i sqrt(lambda_i(M)) for
M = C1^{1/2} C2 C1^{1/2}. Singular covariances (N <= F samples, dead features) have zero
eigenvalues that eigh returns as round-off of either sign, of size up to about F eps ||C||. They are
set to 0, their exact value: negative ones have no real square root, and positive ones would add
sqrt(F eps ||C||) ~ 1e-7 sqrt(||C||) each to the trace, since sqrt is steep at 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["frechet_distance", "frechet_distance_from_statistics", "gaussian_statistics"]


def _check_features(name: str, features: Tensor) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, F) with N >= 2 samples and F >= 1 features, "
                         f"got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (F,) and unbiased covariance (F, F), both float64, of a feature matrix (N, F), N >= 2.

    C = (X - mu)^T (X - mu) / (N - 1), on the features' device.
    """
    _check_features("features", features)
    x = features.to(torch.float64)
    mu = x.mean(dim=0)
    centered = x - mu
    cov = centered.T @ centered / (x.shape[0] - 1)
    return mu, cov


def _psd_eigenvalues(w: Tensor) -> Tensor:
    """Eigenvalues (F,) of a symmetric PSD matrix with those at round-off level set to 0."""
    tol = w.shape[0] * torch.finfo(w.dtype).eps * w.abs().max()
    return torch.where(w > tol, w, 0.0)


def _psd_sqrt(c: Tensor) -> Tensor:
    """The symmetric square root V diag(sqrt(w)) V^T of a symmetric PSD matrix C = V diag(w) V^T."""
    w, v = torch.linalg.eigh(c)
    return (v * _psd_eigenvalues(w).sqrt()) @ v.T


def _check_statistics(mu_name: str, mu: Tensor, cov_name: str, cov: Tensor) -> None:
    for name, t in ((mu_name, mu), (cov_name, cov)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if mu.dim() != 1 or mu.shape[0] < 1:
        raise ValueError(f"{mu_name} must have shape (F,) with F >= 1, got shape {tuple(mu.shape)}")
    f = mu.shape[0]
    if cov.shape != (f, f):
        raise ValueError(f"{cov_name} must have shape ({f}, {f}) to match {mu_name}, "
                         f"got shape {tuple(cov.shape)}")


def frechet_distance_from_statistics(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2}), in float64.

    mu1, mu2: (F,) means; cov1, cov2: (F, F) symmetric positive semi-definite covariances, all on
    one device. The result is a squared distance, as FID reports it.
    """
    _check_statistics("mu1", mu1, "cov1", cov1)
    _check_statistics("mu2", mu2, "cov2", cov2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same number of features, got shapes "
                         f"{tuple(mu1.shape)} and {tuple(mu2.shape)}")
    mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    # Symmetrize: covariances computed as X^T X can be asymmetric in the last bit, and eigh reads
    # only one triangle, so the asymmetry would otherwise be resolved arbitrarily.
    cov1 = (cov1 + cov1.T) / 2
    cov2 = (cov2 + cov2.T) / 2
    root1 = _psd_sqrt(cov1)
    m = root1 @ cov2 @ root1
    cross = _psd_eigenvalues(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross
    # d^2 >= 0 exactly; for (nearly) equal Gaussians round-off can leave it at -1e-13 or so.
    return max(float(d2), 0.0)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """The Frechet (FID-style) distance between two feature sets (Na, F) and (Nb, F), Na, Nb >= 2.

    Each set is fitted by a Gaussian (:func:`gaussian_statistics`) and the Gaussians are compared
    with :func:`frechet_distance_from_statistics`. Symmetric in its arguments; 0 for equal sets.
    """
    _check_features("features_a", features_a)
    _check_features("features_b", features_b)
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same number of features F, "
                         f"got shapes {tuple(features_a.shape)} and {tuple(features_b.shape)}")
    if features_a.device != features_b.device:
        raise ValueError(f"features_a and features_b must be on one device, got "
                         f"{features_a.device} and {features_b.device}")
    return frechet_distance_from_statistics(*gaussian_statistics(features_a),
                                            *gaussian_statistics(features_b))
