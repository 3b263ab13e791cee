"""Nodes for dual-perturbation attacks: salience masks, classifier loading, dual PGD, classification.

Alpha policy: IMAGE values with 4 channels are handled as RGB plus alpha.
Salience, classification and the attack use the RGB channels only. The
alpha channel is copied unchanged to the adversarial image, and the
perturbation preview has 3 channels.

Budgets and step sizes are in pixel units of images scaled to 0..1, the
range of ComfyUI IMAGE values (8/255 = 0.0314).
"""

import json
import logging
import os
from pathlib import Path

import torch

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..loco_core.classifiers import architectures, load_classifier
from ..loco_core.dual_pgd import DualPGDConfig, DualPGDResult, PGDStep, class_scores, dual_pgd_attack
from ..loco_core.salience import mask_from_salience, normalize_mask, spectral_residual_salience

logger = logging.getLogger(__name__)

CLASSIFIER_FOLDER = "classifiers"
PACK_MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
PACK_PREFIX = "pack/"
NO_LABELS = "none (class indices)"
LABEL_SUFFIXES = (".txt", ".json")

Classifier = io.Custom("LOCO_CLASSIFIER")


def _register_classifier_folder() -> None:
    # ComfyUI 0.3.64 already defines models/classifiers, but its extension
    # filter lists only files without a suffix, so the nodes scan its paths
    # themselves. Versions without the folder get it registered here. The
    # extra_model_paths.yaml key "classifiers" adds more locations.
    if CLASSIFIER_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CLASSIFIER_FOLDER, os.path.join(folder_paths.models_dir, CLASSIFIER_FOLDER))


_register_classifier_folder()


# ---------------------------------------------------------------------------
# Conversions between ComfyUI layouts and the core's [B, C, H, W] tensors.


def split_image(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split an IMAGE ``[B, H, W, C]`` into RGB ``[B, 3, H, W]`` and alpha ``[B, H, W, 1]`` (or None)."""
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise ValueError(f"IMAGE must be [B, H, W, 3] or [B, H, W, 4], got shape {tuple(image.shape)}")
    rgb = image[..., :3].movedim(-1, 1).to(torch.float32).clone()
    alpha = image[..., 3:].clone() if image.shape[-1] == 4 else None
    return rgb, alpha


def join_image(rgb: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """Turn RGB ``[B, 3, H, W]`` back into an IMAGE, appending the original alpha when there was one."""
    image = rgb.movedim(1, -1)
    if alpha is not None:
        image = torch.cat([image, alpha.to(image.device, image.dtype)], dim=-1)
    return image


# ---------------------------------------------------------------------------
# Classifier files.


def _pack_classifier_files() -> list[str]:
    # The pack's assets/models also contains diffusion models, so only files
    # with "cnn" or "classifier" in the name are offered here.
    if not PACK_MODELS_DIR.is_dir():
        return []
    names = sorted(path.name for path in PACK_MODELS_DIR.glob("*.safetensors"))
    return [PACK_PREFIX + name for name in names if "cnn" in name or "classifier" in name]


def _folder_files(suffixes: tuple[str, ...]) -> list[str]:
    """Return files with the given suffixes under the classifier folders, as paths relative to their folder."""
    found = set()
    for root in folder_paths.get_folder_paths(CLASSIFIER_FOLDER):
        root_path = Path(root)
        if root_path.is_dir():
            for path in root_path.rglob("*"):
                if path.suffix.lower() in suffixes and path.is_file():
                    found.add(path.relative_to(root_path).as_posix())
    return sorted(found)


def _find_in_folders(name: str) -> Path | None:
    for root in folder_paths.get_folder_paths(CLASSIFIER_FOLDER):
        path = Path(root) / name
        if path.is_file():
            return path
    return None


def classifier_files() -> list[str]:
    """Return the weight files the loader offers: the pack's own, then .safetensors files in models/classifiers."""
    return _pack_classifier_files() + _folder_files((".safetensors",))


def label_files() -> list[str]:
    """Return the labels choices: none, then .txt and .json files in the classifier folders."""
    return [NO_LABELS] + _folder_files(LABEL_SUFFIXES)


def resolve_weights(name: str) -> Path:
    if name.startswith(PACK_PREFIX):
        path = PACK_MODELS_DIR / name[len(PACK_PREFIX) :]
    else:
        path = _find_in_folders(name) or Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {name!r} not found; put .safetensors files in models/classifiers")
    return path


def resolve_labels(name: str) -> Path | None:
    if name == NO_LABELS:
        return None
    path = _find_in_folders(name)
    if path is None:
        raise FileNotFoundError(f"labels file {name!r} not found in the {CLASSIFIER_FOLDER} folders")
    return path


# ---------------------------------------------------------------------------
# Class lists typed by the user ("3", "cat", "1, 2, 7").


def parse_classes(text: str, labels: list[str], batch: int, what: str) -> torch.Tensor | None:
    """Parse comma-separated class indices or label names; one entry applies to the whole batch.

    Returns None for an empty string.
    """
    entries = [entry.strip() for entry in text.replace("\n", ",").split(",") if entry.strip()]
    if not entries:
        return None
    indices = [_class_index(entry, labels, what) for entry in entries]
    if len(indices) == 1:
        indices = indices * batch
    if len(indices) != batch:
        raise ValueError(f"{what} has {len(indices)} entries but the batch has {batch} images; give 1 or {batch}")
    return torch.tensor(indices, dtype=torch.long)


def _class_index(entry: str, labels: list[str], what: str) -> int:
    if entry in labels:
        return labels.index(entry)
    try:
        index = int(entry)
    except ValueError:
        shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        raise ValueError(f"{what}: {entry!r} is neither a class index nor a label ({shown})") from None
    if not 0 <= index < len(labels):
        raise ValueError(f"{what}: class index {index} is out of range 0..{len(labels) - 1}")
    return index


# ---------------------------------------------------------------------------
# Nodes.


class LOCOSalienceMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LOCOSalienceMask",
            display_name="LOCO Salience Mask",
            category="LOCO/attacks",
            description=(
                "Computes a spectral residual salience map of each image (Hou and Zhang, 2007) and turns it into a "
                "0/1 foreground MASK for the dual PGD attack, by the most salient fraction of pixels or a threshold. "
                "Uses the RGB channels; an alpha channel is ignored."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Images [B,H,W,C] in 0..1; 3 or 4 channels."),
                io.Combo.Input(
                    "rule",
                    options=["top_fraction", "threshold"],
                    default="top_fraction",
                    tooltip="top_fraction: the most salient share of pixels per image is foreground. "
                    "threshold: pixels whose salience (scaled to a maximum of 1) reaches the threshold.",
                ),
                io.Float.Input(
                    "top_fraction", default=0.3, min=0.01, max=1.0, step=0.01,
                    tooltip="Share of pixels in the foreground, 0.01..1 (used by rule top_fraction).",
                ),
                io.Float.Input(
                    "threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                    tooltip="Salience level 0..1 (map scaled to a maximum of 1) at which a pixel becomes foreground "
                    "(used by rule threshold).",
                ),
                io.Float.Input(
                    "blur", default=0.05, min=0.0, max=0.5, step=0.005,
                    tooltip="Gaussian smoothing of the map, sigma as a fraction of the shorter side of the working "
                    "image, 0..0.5.",
                ),
                io.Int.Input(
                    "work_size", default=64, min=16, max=1024, step=8,
                    tooltip="Long side in pixels at which the map is computed (64 in the original method); "
                    "larger images are reduced first and the map is upsampled back.",
                ),
            ],
            outputs=[
                io.Mask.Output("foreground", display_name="foreground", tooltip="0/1 foreground mask [B,H,W]; 1 marks the salient region."),
                io.Mask.Output("salience", display_name="salience", tooltip="Salience map [B,H,W] in 0..1 (maximum 1 per image)."),
            ],
        )

    @classmethod
    def execute(cls, image, rule, top_fraction, threshold, blur, work_size) -> io.NodeOutput:
        rgb, _ = split_image(image)
        salience = spectral_residual_salience(rgb, work_size=work_size, blur_fraction=blur)
        if rule == "top_fraction":
            mask = mask_from_salience(salience, top_fraction=top_fraction)
        elif rule == "threshold":
            mask = mask_from_salience(salience, threshold=threshold)
        else:
            raise ValueError(f"unknown rule {rule!r}; use top_fraction or threshold")
        device = comfy.model_management.intermediate_device()
        return io.NodeOutput(mask.to(device), salience.to(device))


class LOCOLoadClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LOCOLoadClassifier",
            display_name="LOCO Load Classifier",
            category="LOCO/attacks",
            description=(
                "Loads an image classifier from a .safetensors file for the attack nodes. Input normalisation is "
                "part of the loaded model, so budgets stay in pixel units. With noise_sigma > 0 the classifier is "
                "Gaussian-noise smoothed and decides by a seeded majority vote. Pickle files (.pt, .ckpt) are never "
                "loaded."
            ),
            inputs=[
                io.Combo.Input(
                    "weights",
                    options=classifier_files(),
                    tooltip="Weights: pack/... are the pack's own models; others come from models/classifiers.",
                ),
                io.Combo.Input(
                    "architecture",
                    options=sorted(architectures()),
                    default="digit_cnn",
                    tooltip="Network that the weights belong to. digit_cnn: the pack's 32x32 digit classifier. "
                    "resnet*: torchvision ResNets with ImageNet normalisation; the class count comes from the weights.",
                ),
                io.Combo.Input(
                    "labels",
                    options=label_files(),
                    tooltip="Class names: a .txt file (one per line) or .json list in models/classifiers; "
                    "without one, labels are the class indices.",
                ),
                io.Float.Input(
                    "noise_sigma", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Gaussian smoothing noise, standard deviation in pixel units of 0..1 images "
                    "(0.25 = 64/255); 0 gives the plain deterministic classifier.",
                ),
                io.Int.Input(
                    "vote_draws", default=100, min=1, max=100000,
                    tooltip="Noise draws in the majority vote of a smoothed classifier (ignored when noise_sigma is 0).",
                ),
                io.Int.Input(
                    "vote_seed", default=0, min=0, max=0xFFFFFFFF,
                    tooltip="Seed of the vote's noise, so the smoothed decision repeats exactly.",
                ),
            ],
            outputs=[Classifier.Output("classifier", display_name="classifier", tooltip="Classifier taking 0..1 RGB images.")],
        )

    @classmethod
    def execute(cls, weights, architecture, labels, noise_sigma, vote_draws, vote_seed) -> io.NodeOutput:
        classifier = load_classifier(
            resolve_weights(weights),
            architecture,
            labels_path=resolve_labels(labels),
            noise_sigma=noise_sigma,
            vote_draws=vote_draws,
            vote_seed=vote_seed,
            device=comfy.model_management.get_torch_device(),
        )
        return io.NodeOutput(classifier)


def _classifier_on_device(classifier: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # Moving happens outside inference mode so the weights stay usable by
    # autograd. NOTE: the classifier value is shared between nodes; it is
    # moved in place, the way ComfyUI's model management moves models.
    first = next(classifier.parameters(), None)
    if first is not None and first.device != device:
        with torch.inference_mode(False):
            classifier.to(device)
    return classifier


def _predictions(classifier, rgb: torch.Tensor) -> list[dict]:
    scores = class_scores(classifier, rgb)
    confidence, prediction = scores.max(dim=1)
    top = scores.topk(min(5, scores.shape[1]), dim=1)
    labels = classifier.labels
    records = []
    for i in range(rgb.shape[0]):
        records.append({
            "index": i,
            "prediction": int(prediction[i]),
            "label": labels[int(prediction[i])],
            "confidence": float(confidence[i]),
            "top": [[labels[int(c)], float(s)] for s, c in zip(top.values[i], top.indices[i])],
        })
    return records


class LOCOClassifyImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LOCOClassifyImage",
            display_name="LOCO Classify Image",
            category="LOCO/attacks",
            description=(
                "Classifies each image and returns the predictions as JSON. A smoothed classifier reports its "
                "majority vote and vote shares. Uses the RGB channels; an alpha channel is ignored."
            ),
            inputs=[
                Classifier.Input("classifier", tooltip="Classifier from LOCO Load Classifier."),
                io.Image.Input("image", tooltip="Images [B,H,W,C] in 0..1; 3 or 4 channels."),
            ],
            outputs=[
                io.String.Output(
                    "predictions", display_name="predictions",
                    tooltip="JSON list, one entry per image: prediction index, label, confidence (softmax "
                    "probability or vote share) and the top 5 classes.",
                ),
            ],
        )

    @classmethod
    def execute(cls, classifier, image) -> io.NodeOutput:
        device = comfy.model_management.get_torch_device()
        classifier = _classifier_on_device(classifier, device)
        rgb, _ = split_image(image)
        with torch.inference_mode(False):
            records = _predictions(classifier, rgb.to(device))
        return io.NodeOutput(json.dumps(records, indent=1))


class LOCODualPGDAttack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LOCODualPGDAttack",
            display_name="LOCO Dual PGD Attack",
            category="LOCO/attacks",
            description=(
                "Projected gradient attack with separate budgets on the foreground (MASK = 1) and the background: "
                "a small budget where the viewer looks and a larger one elsewhere. L-inf or L2, random start, "
                "restarts (best kept per image), targeted or untargeted, EOT noise draws for smoothed classifiers, "
                "and an optional penalty on background salience to keep the background inconspicuous. Budgets and "
                "steps are in pixel units of 0..1 images (8/255 = 0.0314). An alpha channel is passed through."
            ),
            inputs=[
                Classifier.Input("classifier", tooltip="Classifier from LOCO Load Classifier."),
                io.Image.Input("image", tooltip="Images [B,H,W,C] in 0..1; 3 or 4 channels."),
                io.Mask.Input(
                    "foreground",
                    tooltip="Foreground MASK ([H,W], [B,H,W] or [B,1,H,W], image size), e.g. from LOCO Salience Mask. "
                    "Binarised at 0.5; one mask applies to the whole batch.",
                ),
                io.Combo.Input("norm", options=["linf", "l2"], default="linf", tooltip="Norm of both budgets."),
                io.Float.Input(
                    "eps_foreground", default=0.0078, min=0.0, max=100.0, step=0.0001,
                    tooltip="Foreground budget in pixel units of 0..1 images. L-inf: max per-pixel change, "
                    "at most 1 (2/255 = 0.0078). L2: Euclidean norm of the foreground perturbation.",
                ),
                io.Float.Input(
                    "eps_background", default=0.0627, min=0.0, max=100.0, step=0.0001,
                    tooltip="Background budget in pixel units of 0..1 images. L-inf: at most 1 "
                    "(16/255 = 0.0627). L2: Euclidean norm of the background perturbation.",
                ),
                io.Int.Input("steps", default=40, min=1, max=10000, tooltip="PGD iterations per restart."),
                io.Float.Input(
                    "step_foreground", default=0.0, min=0.0, max=100.0, step=0.0001,
                    tooltip="Foreground step size in pixel units; 0 uses 2.5 * eps_foreground / steps.",
                ),
                io.Float.Input(
                    "step_background", default=0.0, min=0.0, max=100.0, step=0.0001,
                    tooltip="Background step size in pixel units; 0 uses 2.5 * eps_background / steps.",
                ),
                io.Int.Input(
                    "restarts", default=1, min=1, max=100,
                    tooltip="Independent runs from different random starts; the best is kept per image.",
                ),
                io.Boolean.Input(
                    "random_start", default=True,
                    tooltip="Start each restart at a uniformly random point inside each region's budget "
                    "(off: start at the clean image).",
                ),
                io.Combo.Input(
                    "mode", options=["untargeted", "targeted"], default="untargeted",
                    tooltip="untargeted: move away from the true class. targeted: reach the target class; "
                    "success then means the target class is predicted.",
                ),
                io.String.Input(
                    "labels", default="",
                    tooltip="True classes: one index or label name for the whole batch, or a comma-separated "
                    "list with one per image. Empty: the classifier's clean predictions.",
                ),
                io.String.Input(
                    "target", default="",
                    tooltip="Target classes for mode targeted: one index or label name, or one per image "
                    "(comma-separated). Must be empty in untargeted mode.",
                ),
                io.Int.Input(
                    "eot_draws", default=8, min=1, max=1024,
                    tooltip="Noise draws averaged per gradient (expectation over transformation) for a smoothed "
                    "classifier; ignored for a deterministic one.",
                ),
                io.Float.Input(
                    "salience_weight", default=0.0, min=0.0, max=100.0, step=0.01,
                    tooltip="lambda in loss - lambda * background salience share of the perturbed image; "
                    "0 is the plain dual attack, larger values keep the background less salient.",
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the random starts and EOT noise."),
                io.Float.Input(
                    "perturbation_gain", default=10.0, min=0.1, max=1000.0, step=0.1,
                    tooltip="Amplification of the perturbation preview: 0.5 + gain * delta, clipped to 0..1.",
                ),
            ],
            outputs=[
                io.Image.Output("adversarial", display_name="adversarial", tooltip="Adversarial images [B,H,W,C] in 0..1, alpha kept."),
                io.Image.Output("perturbation", display_name="perturbation", tooltip="Amplified perturbation, 0.5 + gain * delta, RGB [B,H,W,3]."),
                io.String.Output(
                    "report", display_name="report",
                    tooltip="JSON: settings, batch summary and per image success, clean and adversarial prediction "
                    "and confidence, L-inf and L2 norms per region, background salience share before and after.",
                ),
                io.String.Output("summary", display_name="summary", tooltip="Short text summary of the report."),
            ],
        )

    @classmethod
    def execute(
        cls, classifier, image, foreground, norm, eps_foreground, eps_background, steps, step_foreground,
        step_background, restarts, random_start, mode, labels, target, eot_draws, salience_weight, seed,
        perturbation_gain,
    ) -> io.NodeOutput:
        targeted = mode == "targeted"
        config = DualPGDConfig(
            eps_foreground=eps_foreground,
            eps_background=eps_background,
            norm=norm,
            steps=steps,
            step_foreground=step_foreground or None,
            step_background=step_background or None,
            restarts=restarts,
            random_start=random_start,
            targeted=targeted,
            eot_draws=eot_draws,
            salience_weight=salience_weight,
            seed=seed,
        )
        rgb, alpha = split_image(image)
        batch, _, height, width = rgb.shape
        mask = normalize_mask(foreground, batch, height, width)
        true_classes = parse_classes(labels, classifier.labels, batch, "labels")
        target_classes = parse_classes(target, classifier.labels, batch, "target")
        if targeted and target_classes is None:
            raise ValueError("mode is targeted but target is empty; give a class index or label name")
        if not targeted and target_classes is not None:
            raise ValueError("target is set but mode is untargeted; switch mode to targeted or clear target")

        device = comfy.model_management.get_torch_device()
        classifier = _classifier_on_device(classifier, device)
        progress = comfy.utils.ProgressBar(steps * restarts)

        def on_step(state: PGDStep) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            if state.step > 0:
                progress.update(1)

        result = dual_pgd_attack(
            classifier,
            rgb.to(device),
            mask.to(device),
            config,
            labels=None if true_classes is None else true_classes.to(device),
            targets=None if target_classes is None else target_classes.to(device),
            callback=on_step,
        )
        return cls._outputs(result, alpha, classifier.labels, perturbation_gain)

    @classmethod
    def _outputs(cls, result: DualPGDResult, alpha, labels: list[str], gain: float) -> io.NodeOutput:
        output_device = comfy.model_management.intermediate_device()
        adversarial = join_image(result.adversarial.to(output_device), alpha)
        delta = (result.delta_foreground + result.delta_background).to(output_device)
        perturbation = (0.5 + gain * delta).clamp(0.0, 1.0).movedim(1, -1)
        report = build_report(result, labels)
        return io.NodeOutput(adversarial, perturbation, json.dumps(report, indent=1), format_summary(report))


def build_report(result: DualPGDResult, labels: list[str]) -> dict:
    """Return the attack report as a JSON-ready dict with label names added."""
    images = result.per_image()
    for record in images:
        for key in ("label", "clean_prediction", "adversarial_prediction", "target"):
            if record[key] is not None:
                record[f"{key}_name"] = labels[record[key]]
    config = result.config
    step_fg, step_bg = config.step_sizes()
    settings = dict(vars(config), step_foreground=step_fg, step_background=step_bg)
    return {"settings": settings, "summary": result.summary(), "images": images}


def format_summary(report: dict) -> str:
    """Return a few lines of text summarising an attack report."""
    settings, summary = report["settings"], report["summary"]
    lines = [
        f"dual PGD ({settings['norm']}, eps_F={settings['eps_foreground']:.4g}, eps_B={settings['eps_background']:.4g}, "
        f"{settings['steps']} steps x {settings['restarts']} restarts, "
        f"{'targeted' if settings['targeted'] else 'untargeted'})",
        f"success: {round(summary['success_rate'] * summary['images'])}/{summary['images']} "
        f"({summary['success_rate']:.0%}); clean accuracy against labels {summary['clean_accuracy']:.0%}",
    ]
    for record in report["images"]:
        lines.append(
            f"#{record['index']}: {record['clean_prediction_name']} ({record['clean_confidence']:.2f}) -> "
            f"{record['adversarial_prediction_name']} ({record['adversarial_confidence']:.2f}) "
            f"{'success' if record['success'] else 'failed'}; "
            f"|dF|inf={record['foreground_linf']:.4f} |dB|inf={record['background_linf']:.4f}; "
            f"background salience {record['background_salience_share_clean']:.2f} -> "
            f"{record['background_salience_share_adversarial']:.2f}"
        )
    return "\n".join(lines)


NODES = [LOCOSalienceMask, LOCOLoadClassifier, LOCOClassifyImage, LOCODualPGDAttack]
