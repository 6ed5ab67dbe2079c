"""The Frechet distance against closed forms and against scipy's sqrtm.

For commuting covariances C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T (diagonal ones: Q = I), the cross
term is tr((C1^{1/2} C2 C1^{1/2})^{1/2}) = sum_i sqrt(a_i b_i), so
d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 exactly.
"""

import pytest
import torch

from fastgen_kernels.metrics import frechet_distance, frechet_distance_from_statistics, gaussian_statistics

F64 = torch.float64


def random_spd(f: int, generator: torch.Generator) -> torch.Tensor:
    """A random symmetric positive definite (f, f) matrix, eigenvalues >= 0.1."""
    a = torch.randn(f, f, dtype=F64, generator=generator)
    return a @ a.T / f + 0.1 * torch.eye(f, dtype=F64)


def random_psd(f: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A random symmetric positive semi-definite (f, f) matrix of rank `rank`."""
    a = torch.randn(f, rank, dtype=F64, generator=generator)
    return a @ a.T


def random_orthogonal(f: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(f, f, dtype=F64, generator=generator))
    return q


def samples_with_statistics(mu: torch.Tensor, cov: torch.Tensor, n: int,
                            generator: torch.Generator) -> torch.Tensor:
    """n samples (n, F) whose sample mean and unbiased covariance are exactly mu and cov."""
    x = torch.randn(n, mu.shape[0], dtype=F64, generator=generator)
    x = x - x.mean(dim=0)
    # whiten with the sample covariance, then color with cov: (x L0^{-T}) L^T has covariance L L^T
    l0 = torch.linalg.cholesky(x.T @ x / (n - 1))
    white = torch.linalg.solve_triangular(l0, x.T, upper=False).T
    return white @ torch.linalg.cholesky(cov).T + mu


def closed_form(mu1, a, mu2, b) -> float:
    return float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())


@pytest.mark.parametrize("f", [1, 3, 72])
def test_diagonal_covariances_match_closed_form(f, generator):
    mu1, mu2 = torch.randn(2, f, dtype=F64, generator=generator)
    a, b = torch.rand(2, f, dtype=F64, generator=generator) * 3 + 0.01
    got = frechet_distance_from_statistics(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(closed_form(mu1, a, mu2, b), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("f", [2, 17, 128])
def test_commuting_covariances_match_closed_form(f, generator):
    q = random_orthogonal(f, generator)
    mu1, mu2 = torch.randn(2, f, dtype=F64, generator=generator)
    a, b = torch.rand(2, f, dtype=F64, generator=generator) * 3 + 0.01
    b[: f // 4] = 0  # a singular C2: its zero eigenvalues come out of eigh slightly negative
    c1, c2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    got = frechet_distance_from_statistics(mu1, c1, mu2, c2)
    assert got == pytest.approx(closed_form(mu1, a, mu2, b), rel=1e-11)


def test_feature_sets_match_closed_form(generator):
    """End to end: samples built to have given statistics give the closed-form distance."""
    f = 10
    q = random_orthogonal(f, generator)
    mu1, mu2 = torch.randn(2, f, dtype=F64, generator=generator)
    a, b = torch.rand(2, f, dtype=F64, generator=generator) + 0.1
    xa = samples_with_statistics(mu1, q @ torch.diag(a) @ q.T, 50, generator)
    xb = samples_with_statistics(mu2, q @ torch.diag(b) @ q.T, 31, generator)
    assert frechet_distance(xa, xb) == pytest.approx(closed_form(mu1, a, mu2, b), rel=1e-9)


@pytest.mark.parametrize("f", [5, 64])
def test_matches_scipy_sqrtm(f, generator):
    """The usual FID formula, tr(C1) + tr(C2) - 2 tr(sqrtm(C1 C2)), on random SPD matrices."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = torch.randn(2, f, dtype=F64, generator=generator)
    c1, c2 = random_spd(f, generator), random_spd(f, generator)
    cross = linalg.sqrtm((c1 @ c2).numpy()).real.trace()
    expected = float((mu1 - mu2).square().sum() + c1.trace() + c2.trace()) - 2 * cross
    got = frechet_distance_from_statistics(mu1, c1, mu2, c2)
    assert got == pytest.approx(expected, rel=1e-10)


def test_gaussian_statistics_match_torch(generator):
    x = torch.randn(40, 9, generator=generator) * 2 + 1  # float32 in, float64 out
    mu, cov = gaussian_statistics(x)
    assert mu.dtype == cov.dtype == F64 and mu.shape == (9,) and cov.shape == (9, 9)
    torch.testing.assert_close(mu, x.double().mean(dim=0))
    torch.testing.assert_close(cov, torch.cov(x.double().T))


def test_symmetric_and_zero_for_identical_sets(generator):
    # 20 samples of 32 features: singular covariances, the case eigenvalue clamping is for
    xa = torch.randn(20, 32, generator=generator)
    xb = torch.randn(60, 32, generator=generator) * 1.5 + 0.3
    d_ab, d_ba = frechet_distance(xa, xb), frechet_distance(xb, xa)
    assert d_ab > 1
    assert d_ab == pytest.approx(d_ba, rel=1e-12)
    scale = float(gaussian_statistics(xa)[1].trace())
    assert 0 <= frechet_distance(xa, xa) < 1e-12 * scale
    assert 0 <= frechet_distance(xa, xa[torch.randperm(20, generator=generator)]) < 1e-12 * scale


def test_statistics_of_a_rank_deficient_covariance(generator):
    """A rank-3 covariance against itself, shifted: the distance is the squared mean shift."""
    c = random_psd(12, 3, generator)
    mu = torch.randn(12, dtype=F64, generator=generator)
    got = frechet_distance_from_statistics(mu, c, mu + 0.5, c)
    assert got == pytest.approx(12 * 0.25, rel=1e-10)


@pytest.mark.parametrize("a, b, error, match", [
    ([[1.0, 2.0], [3.0, 4.0]], None, TypeError, "features_a must be a torch.Tensor"),
    (torch.ones(4, 3, dtype=torch.int64), None, TypeError, "features_a must be a floating-point"),
    (torch.ones(4), None, ValueError, r"features_a must have shape \(N, F\)"),
    (torch.ones(1, 3), None, ValueError, "N >= 2"),
    (torch.ones(4, 3), torch.ones(4, 2), ValueError, "same number of features"),
    (torch.ones(4, 3), torch.full((4, 3), float("nan")), ValueError, "features_b contains NaN"),
])
def test_bad_feature_sets_raise(a, b, error, match):
    with pytest.raises(error, match=match):
        frechet_distance(a, torch.ones(4, 3) if b is None else b)


def test_bad_statistics_raise():
    mu, cov = torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match=r"cov2 must have shape \(3, 3\)"):
        frechet_distance_from_statistics(mu, cov, mu, torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="mu1 and mu2 must have the same number of features"):
        frechet_distance_from_statistics(mu, cov, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match=r"mu1 must have shape \(F,\)"):
        frechet_distance_from_statistics(cov, cov, mu, cov)
    with pytest.raises(TypeError, match="cov1 must be a torch.Tensor"):
        frechet_distance_from_statistics(mu, None, mu, cov)
    with pytest.raises(ValueError, match=r"features must have shape \(N, F\)"):
        gaussian_statistics(torch.ones(1, 3))
