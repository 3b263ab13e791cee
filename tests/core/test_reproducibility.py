"""Closed-form checks of the reproducibility metrics, statistics and noise files (no ComfyUI)."""

import itertools
import json

import pytest
import safetensors.torch
import torch

from loco_core import image_metrics, reproducibility, reproducibility_plots
from loco_core.reproducibility import SeedNoise


def random_images(count: int, seed: int, size: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator)


# --- SSIM -------------------------------------------------------------------


def test_ssim_identical_images_is_one():
    images = random_images(4, seed=0)
    assert torch.allclose(image_metrics.ssim_pairs(images, images), torch.ones(4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("value_a,value_b", [(0.2, 0.2), (0.2, 0.7), (0.0, 1.0), (0.5, 0.25)])
def test_ssim_constant_images_closed_form(value_a, value_b):
    # Constant images have zero variance and covariance, so SSIM reduces to the
    # luminance term (2 a b + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 1)^2.
    a = torch.full((1, 3, 16, 16), value_a, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), value_b, dtype=torch.float64)
    c1 = 0.01**2
    expected = (2 * value_a * value_b + c1) / (value_a**2 + value_b**2 + c1)
    assert image_metrics.ssim_pairs(a, b).item() == pytest.approx(expected, abs=1e-10)


def test_ssim_negated_contrast_closed_form():
    # An 11x11 image has exactly one valid 11x11 window, so the SSIM is the
    # formula evaluated on the Gaussian-weighted sums over the whole image.
    # Stripes and their negative have covariance close to -variance.
    a = torch.zeros(1, 1, 11, 11)
    a[..., ::2, :] = 1.0
    b = 1.0 - a
    window = image_metrics.gaussian_window()
    mean_a = (window * a[0, 0].double()).sum()
    mean_b = (window * b[0, 0].double()).sum()
    var_a = (window * a[0, 0].double() ** 2).sum() - mean_a**2
    var_b = (window * b[0, 0].double() ** 2).sum() - mean_b**2
    cov = (window * (a[0, 0] * b[0, 0]).double()).sum() - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    assert image_metrics.ssim_pairs(a, b).item() == pytest.approx(float(expected), abs=1e-12)
    assert expected < -0.9


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a = random_images(1, seed=1, size=32)
    b = (a + 0.1 * random_images(1, seed=2, size=32)).clamp(0, 1)
    reference = metrics.structural_similarity(
        a[0].permute(1, 2, 0).double().numpy(),
        b[0].permute(1, 2, 0).double().numpy(),
        channel_axis=2,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert image_metrics.ssim_pairs(a, b).item() == pytest.approx(reference, abs=1e-6)


def test_ssim_rejects_image_smaller_than_window():
    small = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="smaller than the 11x11 SSIM window"):
        image_metrics.ssim_pairs(small, small)


def test_gaussian_window_sums_to_one():
    window = image_metrics.gaussian_window(11, 1.5)
    assert window.shape == (11, 11)
    assert window.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(window, window.T)


# --- cosine and MAE -----------------------------------------------------------


def test_pixel_cosine_closed_form_cases():
    a = random_images(1, seed=3)
    centred = a - a.mean()
    assert image_metrics.pixel_cosine_pairs(a, a).item() == pytest.approx(1.0, abs=1e-12)
    # Scaling and shifting leave the centred direction unchanged.
    assert image_metrics.pixel_cosine_pairs(a, 0.5 * a + 0.2).item() == pytest.approx(1.0, abs=1e-12)
    # The mirror image about the mean points the opposite way.
    assert image_metrics.pixel_cosine_pairs(a, a.mean() - centred).item() == pytest.approx(-1.0, abs=1e-12)


def test_pixel_cosine_orthogonal_patterns_is_zero():
    # Rows alternating and columns alternating are orthogonal after centring.
    rows = torch.zeros(1, 1, 8, 8)
    rows[..., ::2, :] = 1.0
    columns = torch.zeros(1, 1, 8, 8)
    columns[..., :, ::2] = 1.0
    assert image_metrics.pixel_cosine_pairs(rows, columns).item() == pytest.approx(0.0, abs=1e-12)


def test_mae_similarity_closed_form():
    a = torch.full((2, 3, 4, 4), 0.25)
    b = torch.full((2, 3, 4, 4), 0.75)
    assert torch.allclose(image_metrics.mae_similarity_pairs(a, b), torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.allclose(image_metrics.mae_similarity_pairs(a, a), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("metric", image_metrics.PIXEL_METRICS)
def test_similarity_matrix_matches_pairs(metric):
    a = random_images(3, seed=4, size=16)
    b = random_images(5, seed=5, size=16)
    matrix = image_metrics.similarity_matrix(a, b, metric, pairs_per_chunk=4)
    assert matrix.shape == (3, 5)
    for i, j in itertools.product(range(3), range(5)):
        expected = image_metrics.similarity_pairs(a[i : i + 1], b[j : j + 1], metric).item()
        assert matrix[i, j].item() == pytest.approx(expected, abs=1e-12)


def test_similarity_rejects_different_sizes():
    with pytest.raises(ValueError, match="same \\[C, H, W\\]"):
        image_metrics.similarity_matrix(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 12, 12), "mae")


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="unknown pixel metric 'psnr'"):
        image_metrics.similarity_matrix(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), "psnr")


def test_embedding_cosine_matrix_closed_form():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    expected = torch.tensor([[1.0, 2**-0.5, -1.0], [0.0, 2**-0.5, 0.0]], dtype=torch.float64)
    assert torch.allclose(image_metrics.embedding_cosine_matrix(a, b), expected, atol=1e-12)


def test_resize_images_returns_copy_at_same_size():
    images = random_images(2, seed=6, size=16)
    resized = image_metrics.resize_images(images, 16, 16)
    assert torch.equal(resized, images)
    assert resized.data_ptr() != images.data_ptr()
    assert image_metrics.resize_images(images, 8, 8).shape == (2, 3, 8, 8)


# --- threshold, ROC-AUC, RP --------------------------------------------------


def test_calibrate_threshold_linear_quantile():
    null = torch.arange(101, dtype=torch.float64)  # 0..100
    assert reproducibility.calibrate_threshold(null, 0.99) == pytest.approx(99.0)
    assert reproducibility.calibrate_threshold(torch.tensor([0.0, 1.0]), 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.1, 1.5])
def test_calibrate_threshold_rejects_bad_quantile(quantile):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        reproducibility.calibrate_threshold(torch.rand(10), quantile)


def test_calibrate_threshold_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty null"):
        reproducibility.calibrate_threshold(torch.empty(0))
    with pytest.raises(ValueError, match="NaN"):
        reproducibility.calibrate_threshold(torch.tensor([0.1, float("nan")]))


def test_roc_auc_perfect_separation_is_one():
    assert reproducibility.roc_auc(torch.tensor([0.8, 0.9, 1.0]), torch.tensor([0.1, 0.2])) == 1.0
    assert reproducibility.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9, 1.0])) == 0.0


def test_roc_auc_identical_distributions_is_half():
    scores = torch.tensor([0.3, 0.5, 0.5, 0.9])
    assert reproducibility.roc_auc(scores, scores.clone()) == pytest.approx(0.5)
    assert reproducibility.roc_auc(torch.full((3,), 0.4), torch.full((5,), 0.4)) == pytest.approx(0.5)


def test_roc_auc_with_ties_matches_pair_count():
    positive = torch.tensor([0.2, 0.5, 0.5, 0.7, 0.9])
    negative = torch.tensor([0.1, 0.5, 0.5, 0.6])
    # AUC = P(pos > neg) + 0.5 P(pos == neg) over all pairs.
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positive.tolist() for n in negative.tolist())
    expected = wins / (len(positive) * len(negative))
    assert reproducibility.roc_auc(positive, negative) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(7)
    positive = (torch.randn(40, generator=generator) + 1.0).round(decimals=1)
    negative = torch.randn(60, generator=generator).round(decimals=1)
    labels = [1] * 40 + [0] * 60
    expected = metrics.roc_auc_score(labels, torch.cat([positive, negative]).numpy())
    assert reproducibility.roc_auc(positive, negative) == pytest.approx(expected, abs=1e-12)


def test_average_ranks_use_midranks():
    ranks = reproducibility.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0]))
    assert ranks.tolist() == [3.5, 1.0, 3.5, 2.0]


def test_reproducibility_score_counts_strictly_above():
    matched = torch.tensor([0.1, 0.5, 0.6, 0.9])
    assert reproducibility.reproducibility_score(matched, 0.5) == 0.5
    assert reproducibility.reproducibility_score(matched, 0.95) == 0.0


def test_compare_models_identical_models_score_one():
    # Two models that produce the same image per seed: matched similarity 1,
    # mismatched pairs clearly lower, so RP = 1 and AUC = 1.
    samples = random_images(6, seed=8, size=16)
    similarity = image_metrics.similarity_matrix(samples, samples, "pixel_cosine")
    result = reproducibility.compare_models("pixel_cosine", {(0, 1): similarity}, model_count=2)
    assert result.rp_matrix[0, 1].item() == 1.0
    assert result.roc_auc == 1.0
    assert result.threshold < 1.0
    assert result.mismatched.numel() == 6 * 5


def test_compare_models_unrelated_models_score_near_null():
    a = random_images(12, seed=9, size=16)
    b = random_images(12, seed=10, size=16)
    similarity = image_metrics.similarity_matrix(a, b, "mae")
    result = reproducibility.compare_models("mae", {(0, 1): similarity}, model_count=2, null_quantile=0.9)
    assert result.rp_matrix[0, 1].item() <= 0.25
    assert 0.2 < result.roc_auc < 0.8
    assert result.null_exceed_rate == pytest.approx(0.1, abs=0.02)


def test_compare_models_three_models_symmetric_matrix():
    base = random_images(5, seed=11, size=16)
    noisy = (base + 0.02 * random_images(5, seed=12, size=16)).clamp(0, 1)
    other = random_images(5, seed=13, size=16)
    sets = [base, noisy, other]
    pairs = {
        (i, j): image_metrics.similarity_matrix(sets[i], sets[j], "ssim")
        for i in range(3)
        for j in range(i + 1, 3)
    }
    result = reproducibility.compare_models("ssim", pairs, model_count=3)
    assert torch.equal(result.rp_matrix, result.rp_matrix.T)
    assert result.rp_matrix.diagonal().tolist() == [1.0, 1.0, 1.0]
    assert result.rp_matrix[0, 1].item() == 1.0
    assert result.rp_matrix[0, 2].item() < 0.5


def test_compare_models_rejects_missing_pairs_and_single_seed():
    with pytest.raises(ValueError, match="exactly the model pairs"):
        reproducibility.compare_models("mae", {(0, 1): torch.rand(3, 3)}, model_count=3)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        reproducibility.compare_models("mae", {(0, 1): torch.rand(1, 1)}, model_count=2)


# --- memorization --------------------------------------------------------------


def test_memorization_flags_copies_of_training_images():
    training = random_images(8, seed=14, size=16)
    copies = training[[2, 5]].clone()
    novel = random_images(2, seed=15, size=16)
    samples = torch.cat([copies, novel])
    similarity = image_metrics.similarity_matrix(samples, training, "ssim")
    result = reproducibility.memorization(similarity, threshold=0.9)
    assert result.memorized.tolist() == [True, True, False, False]
    assert result.nearest_index[:2].tolist() == [2, 5]
    assert result.memorized_fraction == 0.5
    assert result.generalization_score == 0.5


def test_leave_one_out_nearest_excludes_self():
    training = random_images(5, seed=16, size=16)
    queries = reproducibility.calibration_query_indices(5)
    similarity = image_metrics.similarity_matrix(training[queries], training, "ssim")
    nearest_other = reproducibility.leave_one_out_nearest(similarity, queries)
    assert (nearest_other < 0.99).all()
    for row, query in enumerate(queries.tolist()):
        others = [similarity[row, column].item() for column in range(5) if column != query]
        assert nearest_other[row].item() == pytest.approx(max(others))


def test_calibration_query_indices_cover_range():
    assert reproducibility.calibration_query_indices(10, max_queries=256).tolist() == list(range(10))
    indices = reproducibility.calibration_query_indices(1000, max_queries=100)
    assert indices[0].item() == 0
    assert indices[-1].item() == 999
    assert len(indices) == 100


# --- seed noise ----------------------------------------------------------------


def test_seed_noise_is_independent_of_batch_layout():
    together = reproducibility.seed_noise(range(10, 14), (3, 8, 8))
    one_by_one = torch.cat([reproducibility.seed_noise([seed], (3, 8, 8)).noise for seed in range(10, 14)])
    assert torch.equal(together.noise, one_by_one)
    assert together.seeds == (10, 11, 12, 13)
    assert together.noise.dtype == torch.float32
    assert together.noise.device.type == "cpu"


def test_seed_noise_equals_global_manual_seed_draw():
    # ComfyUI's prepare_noise uses torch.manual_seed(seed) then randn: same stream.
    torch.manual_seed(42)
    expected = torch.randn(1, 4, 8, 8)
    assert torch.equal(reproducibility.seed_noise([42], (4, 8, 8)).noise, expected)


def test_seed_noise_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one seed"):
        reproducibility.seed_noise([], (3, 8, 8))
    with pytest.raises(ValueError, match="positive sizes"):
        reproducibility.seed_noise([1], (3, 0, 8))
    with pytest.raises(ValueError, match="seed must be"):
        reproducibility.seed_noise([-1], (3, 8, 8))


def test_seed_noise_select_copies():
    noise = reproducibility.seed_noise([1, 2, 3], (1, 4, 4))
    part = noise.select(1, 3)
    assert part.seeds == (2, 3)
    part.noise.zero_()
    assert noise.noise[1].abs().sum() > 0


def test_seed_noise_file_round_trip(tmp_path):
    noise = reproducibility.seed_noise([5, 9], (3, 8, 8))
    path = tmp_path / "noise.safetensors"
    reproducibility.save_seed_noise(noise, path)
    loaded = reproducibility.load_seed_noise(path)
    assert loaded.seeds == (5, 9)
    assert torch.equal(loaded.noise, noise.noise)


def test_save_seed_noise_never_overwrites(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        reproducibility.save_seed_noise(reproducibility.seed_noise([1], (1, 2, 2)), path)
    assert path.read_bytes() == b"keep me"


def test_load_seed_noise_rejects_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a LOCO seed-noise file"):
        reproducibility.load_seed_noise(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        reproducibility.load_seed_noise(garbage)
    wrong_seeds = tmp_path / "wrong_seeds.safetensors"
    metadata = {"format": "loco_seed_noise", "format_version": "1", "seeds": json.dumps([1, 2, 3])}
    safetensors.torch.save_file({"noise": torch.zeros(2, 1, 2, 2)}, str(wrong_seeds), metadata=metadata)
    with pytest.raises(ValueError, match="2 images but 3 seeds"):
        reproducibility.load_seed_noise(wrong_seeds)


# --- samplers ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m", "uni_pc", "heun"])
def test_deterministic_samplers_pass(name):
    reproducibility.check_deterministic_sampler(name)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "ddpm", "lcm", "dpm_adaptive", "new_sampler"])
def test_stochastic_samplers_rejected_with_names(name):
    with pytest.raises(ValueError) as error:
        reproducibility.check_deterministic_sampler(name)
    message = str(error.value)
    assert repr(name) in message
    assert "choose a deterministic sampler: euler, " in message


def test_sampler_lists_do_not_overlap():
    assert not set(reproducibility.DETERMINISTIC_SAMPLERS) & set(reproducibility.STOCHASTIC_SAMPLERS)


# --- pictures --------------------------------------------------------------------------


def test_render_heatmap_returns_image_tensor():
    picture = reproducibility_plots.render_heatmap(torch.tensor([[1.0, 0.8], [0.8, 1.0]]), ["A", "B"], "RP")
    assert picture.ndim == 4
    assert picture.shape[0] == 1
    assert picture.shape[-1] == 3
    assert picture.min() >= 0.0
    assert picture.max() <= 1.0
    # Dark cells for 1.0 and lighter ones for 0.8 are both present.
    assert picture.min() < 0.2


def test_render_histogram_and_grid_shapes():
    histogram = reproducibility_plots.render_histogram(torch.rand(8), torch.rand(56), 0.7, "SSIM", width=400, height=200)
    assert histogram.shape == (1, 200, 400, 3)
    grid = reproducibility_plots.render_image_grid(
        [torch.rand(3, 3, 8, 8), torch.rand(3, 1, 8, 8)], ["A", "B"], ["1", "2", "3"], cell_size=16
    )
    assert grid.shape[0] == 1
    assert grid.shape[-1] == 3
    with pytest.raises(ValueError, match="one label per row"):
        reproducibility_plots.render_image_grid([torch.rand(3, 3, 8, 8)], ["A", "B"], ["1", "2", "3"])


# --- whole analysis ------------------------------------------------------------------------------


def test_analyse_reproducibility_end_to_end():
    # Model 0 and model 1 agree per seed; model 2 copies training images.
    training = random_images(12, seed=20, size=16)
    base = random_images(6, seed=21, size=16)
    close = (base + 0.01 * random_images(6, seed=22, size=16)).clamp(0, 1)
    copies = training[:6].clone()
    items = {metric: [base, close, copies] for metric in image_metrics.PIXEL_METRICS}
    training_items = {metric: training for metric in image_metrics.PIXEL_METRICS}

    analysis = reproducibility.analyse_reproducibility(items, training_items, null_quantile=0.9)

    for metric in image_metrics.PIXEL_METRICS:
        assert analysis.comparisons[metric].rp_matrix[0, 1].item() == 1.0
        memorized = [result.memorized_fraction for result in analysis.memorization[metric]]
        assert memorized[2] == 1.0
        # Model 0's samples are random like the training images, so they pass
        # the calibrated threshold at about the null rate (1 - 0.9) only.
        assert memorized[0] <= 0.5
        self_similarity = image_metrics.similarity_matrix(training, training, metric)
        nearest_other = reproducibility.leave_one_out_nearest(self_similarity, torch.arange(12))
        expected_threshold = reproducibility.calibrate_threshold(nearest_other, 0.9)
        assert analysis.memorization[metric][0].threshold == pytest.approx(expected_threshold)
        assert analysis.memorization_threshold_source[metric] == "training nearest-neighbour null"
        assert analysis.memorization_null_size[metric] == 12


def test_analysis_report_is_json_ready():
    samples = [random_images(4, seed=23, size=16), random_images(4, seed=24, size=16)]
    training = random_images(5, seed=25, size=16)
    analysis = reproducibility.analyse_reproducibility(
        {"mae": samples}, {"mae": training}, fixed_memorization_thresholds={"mae": 0.95}
    )
    report = reproducibility.analysis_report(analysis, ["A", "B"], (3, 4, 5, 6))
    text = json.dumps(report)
    assert json.loads(text)["seeds"] == [3, 4, 5, 6]
    entry = report["metrics"]["mae"]
    assert entry["null_pairs"] == 12
    assert entry["memorization"]["threshold"] == 0.95
    assert entry["memorization"]["threshold_source"] == "fixed"
    assert len(entry["memorization"]["models"][1]["nearest_training_index"]) == 4
    summary = reproducibility.analysis_summary(analysis, ["A", "B"], "mae")
    assert "RP A vs B" in summary
    assert "GL" in summary


def test_metric_similarity_embedding_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    matrix = reproducibility.metric_similarity(reproducibility.EMBEDDING_METRIC, a, a)
    assert torch.allclose(matrix, torch.eye(2, dtype=torch.float64))
