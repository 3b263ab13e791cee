"""Denoisers whose posterior mean and Jacobian are known in closed form.

For data x0 drawn from a Gaussian N(mu, Sigma) and x = x0 + sigma * noise,
the posterior mean is E[x0 | x] = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu),
so the Jacobian is the symmetric matrix Sigma (Sigma + sigma^2 I)^-1. For a
mixture of Gaussians the posterior mean is the responsibility-weighted sum of
the component means, and by Tweedie's formula the Jacobian is the posterior
covariance Cov[x0 | x] / sigma^2. With low-rank covariances these give the
exact LOCO subspaces that tests, benchmarks and the demo compare against.
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
    """Draw a covariance U diag(variances) U^T + floor * I with a random orthonormal U [dimension, rank]."""
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

    def __post_init__(self):
        # Eigendecompositions once, so every noise level costs only products:
        # (Sigma + sigma^2 I)^-1 = V diag(1 / (lambda + sigma^2)) V^T.
        eigen = [torch.linalg.eigh(cov) for cov in self.covariances]
        self._variances = [values.clamp_min(0) for values, _ in eigen]
        self._bases = [vectors for _, vectors in eigen]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Posterior mean E[x0 | x] for a batch x [B, *image_shape] and sigma [B]."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = sigma.to(device=flat.device, dtype=torch.float64).reshape(-1, 1)
        mean, _, _ = self._posterior(flat, sigma)
        return mean.reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def jacobian(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Exact Jacobian [n, n] of the posterior mean at one image x [1, *image_shape]: Cov[x0 | x] / sigma^2."""
        flat = x.reshape(1, -1).to(torch.float64)
        level = torch.tensor([[sigma]], dtype=torch.float64)
        mean, responsibilities, component_means = self._posterior(flat, level)
        second_moment = torch.zeros(self.dimension, self.dimension, dtype=torch.float64)
        for k in range(len(self.weights)):
            values, basis = self._variances[k], self._bases[k]
            posterior_covariance = basis @ torch.diag(values * sigma**2 / (values + sigma**2)) @ basis.T
            m = component_means[k, 0]
            second_moment += responsibilities[k, 0] * (posterior_covariance + torch.outer(m, m))
        covariance = second_moment - torch.outer(mean[0], mean[0])
        return covariance / sigma**2

    def _posterior(self, flat: torch.Tensor, sigma: torch.Tensor):
        """Posterior mean [B, n], responsibilities [K, B] and component posterior means [K, B, n].

        ``sigma`` has shape [B, 1].
        """
        log_evidence = []
        component_means = []
        for k in range(len(self.weights)):
            values, basis = self._variances[k], self._bases[k]
            marginal = values[None, :] + sigma**2
            coordinates = (flat - self.means[k]) @ basis
            mahalanobis = (coordinates**2 / marginal).sum(dim=1)
            log_det = torch.log(marginal).sum(dim=1)
            log_evidence.append(torch.log(self.weights[k]) - 0.5 * mahalanobis - 0.5 * log_det)
            component_means.append(self.means[k] + (coordinates * values[None, :] / marginal) @ basis.T)

        responsibilities = torch.softmax(torch.stack(log_evidence), dim=0)
        component_means = torch.stack(component_means)
        mean = (responsibilities[:, :, None] * component_means).sum(dim=0)
        return mean, responsibilities, component_means

    def sample(self, count: int, seed: int) -> torch.Tensor:
        """Draw ``count`` clean images [count, *image_shape] from the mixture."""
        generator = torch.Generator().manual_seed(seed)
        components = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        noise = torch.randn(count, self.dimension, generator=generator, dtype=torch.float64)
        rows = []
        for i, k in enumerate(components.tolist()):
            scaled = noise[i] * self._variances[k].sqrt()
            rows.append(self.means[k] + self._bases[k] @ scaled)
        return torch.stack(rows).reshape(count, *self.image_shape)


def low_rank_gaussian(
    image_shape: tuple[int, ...],
    rank: int,
    seed: int,
    variance_decay: float = 0.8,
    floor: float = 0.0,
) -> GaussianMixture:
    """Build a single Gaussian with a rank-``rank`` covariance whose variances decay geometrically from 1."""
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
    """Build a mixture of equally weighted low-rank Gaussians with random means and subspaces."""
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


def regional_gaussian(
    image_shape: tuple[int, ...],
    mask: torch.Tensor,
    inside_rank: int,
    outside_rank: int,
    shared_rank: int,
    seed: int,
    shared_variance: float = 0.3,
    floor: float = 1e-4,
) -> GaussianMixture:
    """Build a Gaussian whose variation is partly confined to a region and partly shared with the rest.

    ``inside_rank`` directions live inside ``mask`` (broadcast to image_shape),
    ``outside_rank`` outside it, and ``shared_rank`` directions span both, with
    variance ``shared_variance``. Edits of the inside directions stay local;
    the shared ones are what the null-space projection must remove.
    """
    generator = torch.Generator().manual_seed(seed)
    region = mask.expand(image_shape).reshape(-1).to(torch.float64)
    dimension = region.numel()

    def directions(count: int, support: torch.Tensor) -> torch.Tensor:
        raw = torch.randn(dimension, count, generator=generator, dtype=torch.float64) * support[:, None]
        basis, _ = torch.linalg.qr(raw)
        return basis

    inside = directions(inside_rank, region)
    outside = directions(outside_rank, 1 - region)
    shared = directions(shared_rank, torch.ones(dimension, dtype=torch.float64))

    inside_variances = 0.85 ** torch.arange(inside_rank, dtype=torch.float64)
    outside_variances = 0.85 ** torch.arange(outside_rank, dtype=torch.float64)
    covariance = (
        inside @ torch.diag(inside_variances) @ inside.T
        + outside @ torch.diag(outside_variances) @ outside.T
        + shared_variance * shared @ shared.T
        + floor * torch.eye(dimension, dtype=torch.float64)
    )
    mean = 0.1 * torch.randn(dimension, generator=generator, dtype=torch.float64)
    return GaussianMixture(mean[None], covariance[None], torch.ones(1, dtype=torch.float64), image_shape)
