"""Denoisers whose posterior mean and Jacobian are known in closed form.

For data x0 drawn from a Gaussian N(mu, Sigma) and x = x0 + sigma * noise,
the posterior mean is E[x0 | x] = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu),
so the Jacobian is the symmetric matrix Sigma (Sigma + sigma^2 I)^-1. For a
mixture of Gaussians the posterior mean is the responsibility-weighted sum of
the component means, and by Tweedie's formula the Jacobian is the posterior
covariance Cov[x0 | x] / sigma^2. With low-rank covariances these give exact
answers for the LOCO subspaces, used by tests, benchmarks and the demo.
"""

from dataclasses import dataclass

import torch

from .errors import LocoError


def random_low_rank_covariance(
    dimension: int,
    rank: int,
    variances: torch.Tensor,
    generator: torch.Generator,
    floor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A covariance U diag(variances) U^T + floor * I with a random orthonormal U [dimension, rank]."""
    if variances.shape != (rank,):
        raise LocoError(f"variances must have shape ({rank},), got {tuple(variances.shape)}")
    basis, _ = torch.linalg.qr(torch.randn(dimension, rank, generator=generator, dtype=torch.float64))
    covariance = basis @ torch.diag(variances.to(torch.float64)) @ basis.T
    covariance = covariance + floor * torch.eye(dimension, dtype=torch.float64)
    return covariance, basis


@dataclass
class GaussianMixture:
    """Mixture of Gaussians over flattened images of shape ``image_shape``.

    means: [K, n], covariances: [K, n, n], weights: [K] summing to 1.
    Computation runs in float64; outputs take the dtype of the input.
    """

    means: torch.Tensor
    covariances: torch.Tensor
    weights: torch.Tensor
    image_shape: tuple[int, ...]

    @property
    def dimension(self) -> int:
        return self.means.shape[1]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Posterior mean E[x0 | x] for a batch x [B, *image_shape] and sigma [B]."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = sigma.to(torch.float64)
        means = [self._posterior_mean_one(flat[i], sigma[i])[0] for i in range(flat.shape[0])]
        return torch.stack(means).reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def jacobian(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Exact Jacobian [n, n] of the posterior mean at one image x [1, *image_shape]: Cov[x0 | x] / sigma^2."""
        flat = x.reshape(-1).to(torch.float64)
        mean, responsibilities, component_means, component_covs = self._posterior_mean_one(
            flat, torch.tensor(sigma, dtype=torch.float64)
        )
        second_moment = torch.zeros(self.dimension, self.dimension, dtype=torch.float64)
        for k in range(len(self.weights)):
            m = component_means[k]
            second_moment += responsibilities[k] * (component_covs[k] + torch.outer(m, m))
        covariance = second_moment - torch.outer(mean, mean)
        return covariance / sigma**2

    def _posterior_mean_one(self, flat: torch.Tensor, sigma: torch.Tensor):
        identity = torch.eye(self.dimension, dtype=torch.float64)
        log_evidence = []
        component_means = []
        component_covs = []
        for k in range(len(self.weights)):
            cov = self.covariances[k]
            marginal = cov + sigma**2 * identity
            chol = torch.linalg.cholesky(marginal)
            residual = flat - self.means[k]
            solved = torch.cholesky_solve(residual[:, None], chol)[:, 0]
            log_det = 2 * torch.log(torch.diagonal(chol)).sum()
            log_evidence.append(torch.log(self.weights[k]) - 0.5 * (residual @ solved) - 0.5 * log_det)

            gain = torch.cholesky_solve(cov, chol).T  # Sigma (Sigma + sigma^2 I)^-1, Sigma symmetric
            component_means.append(self.means[k] + gain @ residual)
            component_covs.append(cov - gain @ cov)

        responsibilities = torch.softmax(torch.stack(log_evidence), dim=0)
        mean = sum(r * m for r, m in zip(responsibilities, component_means))
        return mean, responsibilities, component_means, component_covs


def low_rank_gaussian(
    image_shape: tuple[int, ...],
    rank: int,
    seed: int,
    variance_decay: float = 0.8,
    floor: float = 0.0,
) -> GaussianMixture:
    """A single Gaussian with a rank-``rank`` covariance whose variances decay geometrically from 1."""
    dimension = 1
    for size in image_shape:
        dimension *= size
    generator = torch.Generator().manual_seed(seed)
    variances = variance_decay ** torch.arange(rank, dtype=torch.float64)
    covariance, _ = random_low_rank_covariance(dimension, rank, variances, generator, floor)
    mean = 0.1 * torch.randn(dimension, generator=generator, dtype=torch.float64)
    return GaussianMixture(mean[None], covariance[None], torch.ones(1, dtype=torch.float64), image_shape)


def low_rank_mixture(
    image_shape: tuple[int, ...],
    components: int,
    rank: int,
    seed: int,
    mean_scale: float = 1.0,
    floor: float = 1e-4,
) -> GaussianMixture:
    """A mixture of equally weighted low-rank Gaussians with random means and subspaces."""
    dimension = 1
    for size in image_shape:
        dimension *= size
    generator = torch.Generator().manual_seed(seed)
    means = mean_scale * torch.randn(components, dimension, generator=generator, dtype=torch.float64)
    covariances = []
    for _ in range(components):
        variances = 0.5 + torch.rand(rank, generator=generator, dtype=torch.float64)
        covariance, _ = random_low_rank_covariance(dimension, rank, variances, generator, floor)
        covariances.append(covariance)
    weights = torch.full((components,), 1.0 / components, dtype=torch.float64)
    return GaussianMixture(means, torch.stack(covariances), weights, image_shape)
