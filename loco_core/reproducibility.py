"""Cross-model reproducibility and memorization scores, in pure torch.

The method (Zhang et al. 2024, "The emergence of reproducibility and
generalizability in diffusion models"), step by step:

1. Draw the starting noise once on the CPU from a seeded generator, one
   seed per image, so image k gets the same noise whatever the batch layout
   (``seed_noise``). Every model starts from that identical tensor.
2. Sample every model with the same deterministic sampler, sigmas and CFG,
   and decode with each model's own VAE. The ComfyUI glue does this, and
   ``check_deterministic_sampler`` lists the samplers that qualify.
3. For each pair of models compare the sample of seed k from model i with
   the sample of seed l from model j. Matched pairs (k = l) measure
   reproducibility; mismatched pairs (k != l) form the null distribution.
4. Calibrate the similarity threshold as a high quantile of the null
   (``calibrate_threshold``, 0.99 by default) and report how well the
   metric separates matched from mismatched pairs (``roc_auc``). The paper
   uses a fixed SSCD cosine threshold of 0.6 instead, whose weights are not
   freely available.
5. Reproducibility score RP = fraction of seeds whose matched pair is more
   similar than the threshold (``reproducibility_score``).
6. Memorization: the nearest training image of each sample; a sample is
   memorized when that similarity exceeds the memorization threshold, and
   the generalization score is GL = 1 - memorized fraction
   (``memorization``).
"""

import json
from dataclasses import dataclass, field

import safetensors
import safetensors.torch
import torch

from . import image_metrics

NOISE_TENSOR_KEY = "noise"
NOISE_FORMAT = "loco_seed_noise"
NOISE_FORMAT_VERSION = "1"

# Sampler names as ComfyUI v0.3.64 lists them (comfy.samplers.KSampler.SAMPLERS).
# These integrate the probability-flow ODE on the given sigma schedule and
# draw no noise after the start, so equal starting noise gives equal paths.
# "ddim" is ComfyUI's Euler sampler; its random option only applies to
# inpainting masks, which the comparison never sets.
DETERMINISTIC_SAMPLERS: tuple[str, ...] = (
    "euler",
    "euler_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)

_STEP_SCHEDULE_REASON = (
    "chooses its own step sizes from the end points instead of the sigma schedule, so models would not share sigmas "
    "and a batch can step differently from a single image"
)

# Samplers with a reason for rejecting them. Names ComfyUI adds later and that
# appear in neither list are rejected as not known to be deterministic.
STOCHASTIC_SAMPLERS: dict[str, str] = {
    "euler_ancestral": "ancestral sampler, adds fresh noise every step",
    "euler_ancestral_cfg_pp": "ancestral sampler, adds fresh noise every step",
    "dpm_2_ancestral": "ancestral sampler, adds fresh noise every step",
    "dpmpp_2s_ancestral": "ancestral sampler, adds fresh noise every step",
    "dpmpp_2s_ancestral_cfg_pp": "ancestral sampler, adds fresh noise every step",
    "res_multistep_ancestral": "ancestral sampler, adds fresh noise every step",
    "res_multistep_ancestral_cfg_pp": "ancestral sampler, adds fresh noise every step",
    "dpmpp_sde": "SDE sampler, adds fresh noise every step",
    "dpmpp_sde_gpu": "SDE sampler, adds fresh noise every step",
    "dpmpp_2m_sde": "SDE sampler, adds fresh noise every step",
    "dpmpp_2m_sde_gpu": "SDE sampler, adds fresh noise every step",
    "dpmpp_2m_sde_heun": "SDE sampler, adds fresh noise every step",
    "dpmpp_2m_sde_heun_gpu": "SDE sampler, adds fresh noise every step",
    "dpmpp_3m_sde": "SDE sampler, adds fresh noise every step",
    "dpmpp_3m_sde_gpu": "SDE sampler, adds fresh noise every step",
    "er_sde": "SDE sampler, adds fresh noise every step",
    "seeds_2": "stochastic exponential integrator (eta 1), adds fresh noise every step",
    "seeds_3": "stochastic exponential integrator (eta 1), adds fresh noise every step",
    "sa_solver": "stochastic Adams solver, adds fresh noise in the middle of the schedule",
    "sa_solver_pece": "stochastic Adams solver, adds fresh noise in the middle of the schedule",
    "ddpm": "DDPM ancestral sampling, adds fresh noise every step",
    "lcm": "LCM-style sampler, re-noises the prediction every step",
    "dpm_fast": _STEP_SCHEDULE_REASON,
    "dpm_adaptive": _STEP_SCHEDULE_REASON,
}


def check_deterministic_sampler(sampler_name: str) -> None:
    """Raise ValueError unless ``sampler_name`` is a deterministic sampler that follows the sigma schedule."""
    if sampler_name in DETERMINISTIC_SAMPLERS:
        return
    reason = STOCHASTIC_SAMPLERS.get(sampler_name, "not known to be deterministic")
    raise ValueError(
        f"sampler {sampler_name!r} cannot be used for a reproducibility comparison ({reason}); "
        f"choose a deterministic sampler: {', '.join(DETERMINISTIC_SAMPLERS)}"
    )


# ---------------------------------------------------------------------------
# Step 1: the shared starting noise


@dataclass(frozen=True)
class SeedNoise:
    """Starting noise ``[N, C, H, W]`` (float32, CPU) with the seed that made each image."""

    noise: torch.Tensor
    seeds: tuple[int, ...]

    def __post_init__(self):
        if self.noise.ndim != 4:
            raise ValueError(f"seed noise must be [N, C, H, W], got shape {tuple(self.noise.shape)}")
        if self.noise.shape[0] != len(self.seeds):
            raise ValueError(f"seed noise has {self.noise.shape[0]} images but {len(self.seeds)} seeds")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image's noise, ``(C, H, W)``."""
        return tuple(self.noise.shape[1:])

    def select(self, start: int, stop: int) -> "SeedNoise":
        return SeedNoise(self.noise[start:stop].clone(), self.seeds[start:stop])


def noise_for_seed(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw standard normal noise of ``shape`` from a CPU generator seeded with ``seed``.

    This is the tensor ComfyUI's KSampler draws for ``seed`` at batch size 1
    (``comfy.sample.prepare_noise`` seeds the CPU generator the same way).
    """
    if seed < 0 or seed > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"seed must be in 0..2^64-1, got {seed}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype, device="cpu")


def seed_noise(seeds: list[int] | range, shape: tuple[int, int, int]) -> SeedNoise:
    """Draw the starting noise for each seed, one generator per seed, stacked to ``[N, C, H, W]``."""
    seeds = tuple(int(seed) for seed in seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    if len(shape) != 3 or any(int(size) < 1 for size in shape):
        raise ValueError(f"noise shape must be (channels, height, width) with positive sizes, got {tuple(shape)}")
    shape = tuple(int(size) for size in shape)
    noise = torch.stack([noise_for_seed(seed, shape) for seed in seeds])
    return SeedNoise(noise, seeds)


def encode_seed_noise(noise: SeedNoise) -> bytes:
    """Serialise seed noise to safetensors bytes; the seeds go into the metadata."""
    metadata = {
        "format": NOISE_FORMAT,
        "format_version": NOISE_FORMAT_VERSION,
        "seeds": json.dumps(list(noise.seeds)),
        "torch_version": torch.__version__,
    }
    tensors = {NOISE_TENSOR_KEY: noise.noise.detach().to("cpu", torch.float32).contiguous()}
    return safetensors.torch.save(tensors, metadata=metadata)


def save_seed_noise(noise: SeedNoise, path) -> None:
    """Write seed noise to a new safetensors file; raises FileExistsError rather than overwrite one."""
    data = encode_seed_noise(noise)
    # Mode "xb" creates the file atomically and fails when it exists.
    with open(path, "xb") as handle:
        handle.write(data)


def load_seed_noise(path) -> SeedNoise:
    """Read seed noise written by ``save_seed_noise``; raises ValueError for any other file."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
            noise = handle.get_tensor(NOISE_TENSOR_KEY) if NOISE_TENSOR_KEY in keys else None
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error

    if metadata.get("format") != NOISE_FORMAT or noise is None:
        raise ValueError(f"{path} is not a LOCO seed-noise file (missing format {NOISE_FORMAT!r} or tensor 'noise')")
    if metadata.get("format_version") != NOISE_FORMAT_VERSION:
        raise ValueError(
            f"{path} has seed-noise format version {metadata.get('format_version')!r}; "
            f"this version reads {NOISE_FORMAT_VERSION!r}"
        )
    try:
        seeds = tuple(int(seed) for seed in json.loads(metadata["seeds"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} has no valid seed list in its metadata: {error}") from error
    return SeedNoise(noise.to(torch.float32), seeds)


# ---------------------------------------------------------------------------
# Steps 3-5: matched and mismatched pairs, threshold, ROC-AUC, RP


def matched_and_mismatched(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a seed-by-seed similarity matrix ``[S, S]`` into matched (diagonal) and mismatched (off-diagonal) values."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square seed-by-seed matrix, got shape {tuple(similarity.shape)}")
    seeds = similarity.shape[0]
    if seeds < 2:
        raise ValueError("need at least 2 seeds: mismatched-seed pairs form the null distribution")
    off_diagonal = ~torch.eye(seeds, dtype=torch.bool)
    return similarity.diagonal().clone(), similarity[off_diagonal]


def calibrate_threshold(null_scores: torch.Tensor, quantile: float = 0.99) -> float:
    """Return the ``quantile`` of the null similarities (linear interpolation between order statistics)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"null quantile must be strictly between 0 and 1, got {quantile}")
    null_scores = null_scores.flatten().to(torch.float64)
    if null_scores.numel() == 0:
        raise ValueError("cannot calibrate a threshold on an empty null distribution")
    if not torch.isfinite(null_scores).all():
        raise ValueError("null similarities contain NaN or infinite values")
    return float(torch.quantile(null_scores, quantile))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Return 1-based ranks of ``values``, tied values sharing the mean of their ranks (midranks)."""
    values = values.flatten()
    order = torch.argsort(values, stable=True)
    _, inverse, counts = torch.unique(values[order], return_inverse=True, return_counts=True)
    # A group of equal values occupies ranks (end - count + 1) .. end; its midrank is their mean.
    group_end = torch.cumsum(counts, dim=0).to(torch.float64)
    group_midrank = group_end - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = group_midrank[inverse]
    return ranks


def roc_auc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U / (n_pos n_neg)); ties count one half."""
    positive_scores = positive_scores.flatten().to(torch.float64)
    negative_scores = negative_scores.flatten().to(torch.float64)
    positives, negatives = positive_scores.numel(), negative_scores.numel()
    if positives == 0 or negatives == 0:
        raise ValueError(f"ROC-AUC needs positive and negative scores, got {positives} and {negatives}")

    ranks = average_ranks(torch.cat([positive_scores, negative_scores]))
    rank_sum = ranks[:positives].sum()
    u_statistic = rank_sum - positives * (positives + 1) / 2
    return float(u_statistic / (positives * negatives))


def reproducibility_score(matched_scores: torch.Tensor, threshold: float) -> float:
    """RP: the fraction of seeds whose matched-pair similarity is strictly above ``threshold``."""
    if matched_scores.numel() == 0:
        raise ValueError("no matched pairs to score")
    return float((matched_scores > threshold).to(torch.float64).mean())


@dataclass
class MetricComparison:
    """Reproducibility statistics of one similarity metric over a set of models."""

    metric: str
    null_quantile: float
    threshold: float
    roc_auc: float
    null_exceed_rate: float
    rp_matrix: torch.Tensor
    mean_matched_matrix: torch.Tensor
    matched: dict[tuple[int, int], torch.Tensor] = field(repr=False)
    mismatched: torch.Tensor = field(repr=False)


def compare_models(
    metric: str,
    pair_similarities: dict[tuple[int, int], torch.Tensor],
    model_count: int,
    null_quantile: float = 0.99,
) -> MetricComparison:
    """Compute threshold, ROC-AUC and the RP matrix from seed-by-seed similarity matrices.

    ``pair_similarities[(i, j)]`` with ``i < j`` is the ``[S, S]`` matrix whose
    entry ``[k, l]`` compares seed k of model i with seed l of model j. The
    null distribution pools the mismatched pairs of all model pairs, so one
    threshold serves the whole matrix. The RP matrix has 1 on its diagonal: a
    deterministic model reproduces itself exactly.
    """
    if model_count < 2:
        raise ValueError(f"a reproducibility comparison needs at least 2 models, got {model_count}")
    expected_pairs = {(i, j) for i in range(model_count) for j in range(i + 1, model_count)}
    if set(pair_similarities) != expected_pairs:
        raise ValueError(f"pair_similarities must hold exactly the model pairs {sorted(expected_pairs)}")

    matched, mismatched = {}, []
    for pair, similarity in pair_similarities.items():
        matched[pair], pair_mismatched = matched_and_mismatched(similarity.to(torch.float64).cpu())
        mismatched.append(pair_mismatched)
    mismatched = torch.cat(mismatched)

    threshold = calibrate_threshold(mismatched, null_quantile)
    auc = roc_auc(torch.cat(list(matched.values())), mismatched)

    rp_matrix = torch.eye(model_count, dtype=torch.float64)
    mean_matched = torch.eye(model_count, dtype=torch.float64)
    for (i, j), scores in matched.items():
        rp_matrix[i, j] = rp_matrix[j, i] = reproducibility_score(scores, threshold)
        mean_matched[i, j] = mean_matched[j, i] = scores.mean()

    return MetricComparison(
        metric=metric,
        null_quantile=null_quantile,
        threshold=threshold,
        roc_auc=auc,
        null_exceed_rate=float((mismatched > threshold).to(torch.float64).mean()),
        rp_matrix=rp_matrix,
        mean_matched_matrix=mean_matched,
        matched=matched,
        mismatched=mismatched,
    )


# ---------------------------------------------------------------------------
# Step 6: nearest training image, memorization and generalization


def nearest_neighbours(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the largest similarity in each row of ``[S, M]`` and its column (the nearest training image)."""
    if similarity.ndim != 2 or similarity.shape[1] == 0:
        raise ValueError(f"need a [samples, training images] similarity matrix, got shape {tuple(similarity.shape)}")
    values, indices = similarity.max(dim=1)
    return values, indices


def leave_one_out_nearest(similarity: torch.Tensor, query_indices: torch.Tensor) -> torch.Tensor:
    """Return each query training image's similarity to its nearest *other* training image.

    ``similarity`` is ``[Q, M]``: row q compares training image
    ``query_indices[q]`` with all M training images. The entry comparing an
    image with itself is excluded.
    """
    if similarity.shape[1] < 2:
        raise ValueError("need at least 2 training images to calibrate a memorization threshold")
    masked = similarity.to(torch.float64).clone()
    masked[torch.arange(masked.shape[0]), query_indices] = -torch.inf
    return masked.max(dim=1).values


def calibration_query_indices(training_count: int, max_queries: int = 256) -> torch.Tensor:
    """Evenly spaced training-image indices used as queries for the memorization null."""
    if training_count <= max_queries:
        return torch.arange(training_count)
    return torch.linspace(0, training_count - 1, max_queries).round().long().unique()


@dataclass
class Memorization:
    """Nearest training image of each sample and the resulting memorization statistics."""

    threshold: float
    nearest_similarity: torch.Tensor
    nearest_index: torch.Tensor
    memorized: torch.Tensor
    memorized_fraction: float
    generalization_score: float


def memorization(sample_to_training: torch.Tensor, threshold: float) -> Memorization:
    """Flag samples whose nearest training image is more similar than ``threshold``; GL = 1 - memorized fraction."""
    nearest_similarity, nearest_index = nearest_neighbours(sample_to_training.to(torch.float64).cpu())
    memorized = nearest_similarity > threshold
    memorized_fraction = float(memorized.to(torch.float64).mean())
    return Memorization(
        threshold=threshold,
        nearest_similarity=nearest_similarity,
        nearest_index=nearest_index,
        memorized=memorized,
        memorized_fraction=memorized_fraction,
        generalization_score=1.0 - memorized_fraction,
    )


# ---------------------------------------------------------------------------
# The whole analysis over N models and any number of metrics

EMBEDDING_METRIC = "embedding_cosine"


def metric_similarity(metric: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compute the ``[len(a), len(b)]`` similarity matrix of a pixel metric or of the embedding cosine."""
    # Scores are statistics, never part of a graph to differentiate.
    a, b = a.detach(), b.detach()
    if metric == EMBEDDING_METRIC:
        return image_metrics.embedding_cosine_matrix(a, b)
    return image_metrics.similarity_matrix(a, b, metric)


@dataclass
class ReproducibilityAnalysis:
    """Per-metric comparisons and, when training items were given, per-model memorization."""

    comparisons: dict[str, MetricComparison]
    memorization: dict[str, list[Memorization]]
    memorization_threshold_source: dict[str, str]
    memorization_null_size: dict[str, int]


def analyse_reproducibility(
    items: dict[str, list[torch.Tensor]],
    training_items: dict[str, torch.Tensor] | None = None,
    null_quantile: float = 0.99,
    fixed_memorization_thresholds: dict[str, float] | None = None,
    max_calibration_queries: int = 128,
) -> ReproducibilityAnalysis:
    """Score every metric: threshold, ROC-AUC and RP over model pairs, then memorization per model.

    ``items[metric][i]`` contains model i's samples in the form the metric
    compares (``[S, C, H, W]`` images for pixel metrics, ``[S, D]`` vectors
    for the embedding cosine), seeds in the same order for every model.
    ``training_items[metric]`` contains the training set in the same form. The
    memorization threshold of a metric is ``fixed_memorization_thresholds
    [metric]`` when given, else the ``null_quantile`` of the similarity of
    training images to their nearest other training image: a sample is
    flagged only when it is closer to a training image than all but the top
    (1 - quantile) of genuinely distinct training images are to each other.
    """
    fixed_memorization_thresholds = fixed_memorization_thresholds or {}
    comparisons, memorized, sources, null_sizes = {}, {}, {}, {}
    for metric, per_model in items.items():
        model_count = len(per_model)
        pairs = {
            (i, j): metric_similarity(metric, per_model[i], per_model[j])
            for i in range(model_count)
            for j in range(i + 1, model_count)
        }
        comparisons[metric] = compare_models(metric, pairs, model_count, null_quantile)

        if training_items is None:
            continue
        training = training_items[metric]
        if metric in fixed_memorization_thresholds:
            threshold = float(fixed_memorization_thresholds[metric])
            sources[metric] = "fixed"
            null_sizes[metric] = 0
        else:
            queries = calibration_query_indices(training.shape[0], max_calibration_queries)
            nearest_other = leave_one_out_nearest(metric_similarity(metric, training[queries], training), queries)
            threshold = calibrate_threshold(nearest_other, null_quantile)
            sources[metric] = "training nearest-neighbour null"
            null_sizes[metric] = int(queries.numel())
        memorized[metric] = [memorization(metric_similarity(metric, samples, training), threshold) for samples in per_model]

    return ReproducibilityAnalysis(comparisons, memorized, sources, null_sizes)


def _rounded(values: torch.Tensor, digits: int = 6) -> list:
    return [round(float(value), digits) for value in values.flatten()]


def analysis_report(analysis: ReproducibilityAnalysis, labels: list[str], seeds: tuple[int, ...]) -> dict:
    """Turn an analysis into plain JSON-ready data: thresholds, AUCs, RP matrices, per-seed scores."""
    metrics = {}
    for metric, comparison in analysis.comparisons.items():
        count = comparison.rp_matrix.shape[0]
        entry = {
            "threshold": round(comparison.threshold, 6),
            "null_quantile": comparison.null_quantile,
            "roc_auc": round(comparison.roc_auc, 6),
            "null_pairs": int(comparison.mismatched.numel()),
            "null_exceed_rate": round(comparison.null_exceed_rate, 6),
            "rp_matrix": [_rounded(comparison.rp_matrix[row]) for row in range(count)],
            "mean_matched_similarity_matrix": [_rounded(comparison.mean_matched_matrix[row]) for row in range(count)],
            "pairs": [
                {
                    "models": [labels[i], labels[j]],
                    "rp": round(float(comparison.rp_matrix[i, j]), 6),
                    "matched_similarity": _rounded(scores),
                }
                for (i, j), scores in comparison.matched.items()
            ],
        }
        if metric in analysis.memorization:
            entry["memorization"] = {
                "threshold": round(analysis.memorization[metric][0].threshold, 6),
                "threshold_source": analysis.memorization_threshold_source[metric],
                "null_queries": analysis.memorization_null_size[metric],
                "models": [
                    {
                        "model": label,
                        "memorized_fraction": round(result.memorized_fraction, 6),
                        "generalization_score": round(result.generalization_score, 6),
                        "nearest_training_index": [int(index) for index in result.nearest_index],
                        "nearest_training_similarity": _rounded(result.nearest_similarity),
                        "memorized": [bool(flag) for flag in result.memorized],
                    }
                    for label, result in zip(labels, analysis.memorization[metric])
                ],
            }
        metrics[metric] = entry
    return {"models": list(labels), "seeds": list(seeds), "metrics": metrics}


def analysis_summary(analysis: ReproducibilityAnalysis, labels: list[str], metric: str) -> str:
    """Write a few lines of plain text about one metric: threshold, AUC, RP per model pair, GL per model."""
    comparison = analysis.comparisons[metric]
    lines = [
        f"metric {metric}: threshold {comparison.threshold:.4f} "
        f"({comparison.null_quantile:.0%} quantile of {comparison.mismatched.numel()} mismatched-seed pairs), "
        f"ROC-AUC {comparison.roc_auc:.3f}, mismatched pairs above threshold {comparison.null_exceed_rate:.3f}",
    ]
    for (i, j), scores in comparison.matched.items():
        lines.append(
            f"RP {labels[i]} vs {labels[j]}: {comparison.rp_matrix[i, j]:.3f} "
            f"(mean matched similarity {scores.mean():.4f})"
        )
    for label, result in zip(labels, analysis.memorization.get(metric, [])):
        lines.append(
            f"{label}: memorized {result.memorized_fraction:.3f}, GL {result.generalization_score:.3f} "
            f"(nearest-training threshold {result.threshold:.4f})"
        )
    return "\n".join(lines)
