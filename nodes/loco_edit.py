"""LOCO Edit nodes: invert, find directions, apply, sweep, transfer, compose, T-LOCO.

Every node that needs the model runs its work through ``loco_adapter``, so
the denoiser is exactly KSampler's. Latents between LOCO nodes stay in model
space inside an InvertedLatent; the LATENT outputs are ordinary ComfyUI
latents for VAEDecode.
"""

from __future__ import annotations

import contextlib
import json
import logging

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..loco_core import (
    DirectionSet,
    JacobianProducts,
    LocoError,
    apply_direction,
    compose,
    decode,
    find_directions,
    invert,
    leakage,
    level_grid,
    masked_subspace,
    pull_back,
    text_change,
    transfer,
)
from ..loco_core.jacobian import JVP_STRATEGIES, VJP_STRATEGIES
from .loco_adapter import (
    decoded_denoiser,
    decoded_shape,
    decoder_for_jacobian,
    model_fingerprint,
    model_space_to_latent,
    run_with_denoiser,
)
from .loco_masks import mask_to_decoded, mask_to_latent
from .loco_preview import directions_preview
from .loco_types import Directions, InvertedLatent, Inversion

logger = logging.getLogger(__name__)

CATEGORY = "LOCO/edit"
# Inversion follows the ODE well only at low guidance; past this CFG scale it
# drifts and the plain decode no longer matches the input.
HIGH_INVERSION_CFG = 2.0
# The spaces in which a mask selects rows of the Jacobian: the latent the
# model denoises, or the image the VAE decodes from the x0 prediction.
MASK_SPACES = ("latent", "decoded image")


class Progress:
    """A ComfyUI progress bar whose every update is also an interrupt point."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(max(total, 1))

    def step(self, *_args) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update(1)


def _check_model(name: str, expected: str, model) -> None:
    actual = model_fingerprint(model)
    if expected and expected != actual:
        logger.warning(
            "%s was made with model %s but is used with model %s; results may not match",
            name, expected, actual,
        )


def _empty_latent(inversion: InvertedLatent, batch: int | None = None) -> torch.Tensor:
    # The guider only needs the shape; an all-zero latent is passed through
    # without process_latent_in, and the task reads the inverted samples.
    shape = inversion.shape if batch is None else (batch, *inversion.shape[1:])
    return torch.zeros(shape)


def _to_output(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(comfy.model_management.intermediate_device())


def _parse_weights(text: str, count: int) -> dict[int, float]:
    """Parse "0:1.0, 2:-0.5" into {0: 1.0, 2: -0.5}, checking indices against ``count``."""
    weights: dict[int, float] = {}
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        index_text, separator, weight_text = part.partition(":")
        try:
            index = int(index_text)
            weight = float(weight_text) if separator else 1.0
        except ValueError:
            raise LocoError(f"direction weight {part!r} is invalid; write index:weight pairs such as '0:1.0, 2:-0.5'") from None
        if not 0 <= index < count:
            raise LocoError(f"direction index {index} in {text!r} is out of range; the set has directions 0..{count - 1}")
        weights[index] = weights.get(index, 0.0) + weight
    if not weights:
        raise LocoError(f"no direction weights in {text!r}; write index:weight pairs such as '0:1.0, 2:-0.5'")
    return weights


def _weights_syntax_error(text: str | None, required: bool = False) -> bool | str:
    """Check index:weight syntax before the graph runs; returns True or the error message."""
    if text is None or (not text.strip() and not required):
        return True
    try:
        _parse_weights(text, count=1 << 30)
    except LocoError as error:
        return str(error)
    return True


def _edit_vector(directions: DirectionSet, index: int, weights_text: str) -> torch.Tensor:
    if not weights_text.strip():
        return directions.direction(index)
    weights = _parse_weights(weights_text, directions.rank)
    return compose([directions.vectors[i] for i in weights], list(weights.values()))


def _check_shapes(directions: DirectionSet, inversion: InvertedLatent) -> None:
    if directions.shape != inversion.shape[1:]:
        raise LocoError(
            f"directions have latent shape {directions.shape} but the inverted latent has {inversion.shape[1:]}; "
            "use directions found on an image of the same size or transfer them first"
        )
    if abs(directions.sigma - inversion.sigma) > 1e-4 * max(1.0, inversion.sigma):
        logger.warning(
            "directions were found at sigma %.4g but the latent is inverted to sigma %.4g; use the same edit level",
            directions.sigma, inversion.sigma,
        )


def _report(directions: DirectionSet) -> str:
    summary = {
        "rank": directions.rank,
        "sigma": directions.sigma,
        "singular_values": [round(float(v), 6) for v in directions.singular_values],
        "model_fingerprint": directions.model_fingerprint,
        "parameters": directions.parameters,
    }
    for name in ("leakage_before", "leakage_after"):
        value = getattr(directions, name)
        if value is not None:
            summary[name] = [round(float(v), 6) for v in value]
    return json.dumps(summary, indent=2, default=str)


def _model_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model to edit with."),
        io.Conditioning.Input("positive", tooltip="Conditioning the denoiser uses (the prompt of the image)."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning; used only when cfg is not 1."),
    ]


def _cfg_input(default: float = 1.0) -> io.Float.Input:
    return io.Float.Input(
        "cfg", default=default, min=0.0, max=30.0, step=0.1,
        tooltip="Classifier-free guidance scale of the denoiser. 1 uses the positive conditioning alone; "
        "inversion drifts at high values.",
    )


def _mask_space_inputs() -> list:
    return [
        io.Combo.Input(
            "mask_space", options=list(MASK_SPACES), default="latent", optional=True,
            tooltip="Where the mask acts. latent: on the x0 prediction in latent space (fast). decoded image: on the "
            "prediction decoded by the vae, pixel by pixel (image VAEs only); every Jacobian product then also runs "
            "the VAE decoder, which costs time and memory.",
        ),
        io.Vae.Input(
            "vae", optional=True,
            tooltip="The model's VAE; needed when mask_space is 'decoded image', unused for 'latent'.",
        ),
    ]


def _check_mask_space(mask_space: str, vae) -> None:
    # ComfyUI checks combo values only for some input forms, so a graph sent
    # over the API can carry any string here.
    if mask_space not in MASK_SPACES:
        raise LocoError(f"mask_space {mask_space!r} is unknown; use one of {list(MASK_SPACES)}")
    if mask_space == "latent" and vae is not None:
        logger.warning("a vae is connected but mask_space is 'latent', so the vae is not used")
    if mask_space != "latent" and vae is None:
        raise LocoError(
            f"mask_space is {mask_space!r} but no vae is connected; connect the model's VAE or use mask_space 'latent'"
        )


def _mask_weights(mask, inversion: InvertedLatent, batch_index: int, mask_space: str, vae) -> torch.Tensor:
    _check_mask_space(mask_space, vae)
    if mask_space == "latent":
        return mask_to_latent(mask, inversion.shape, batch_index)
    return mask_to_decoded(mask, decoded_shape(vae, inversion.shape), batch_index)


def _jacobian_products(space, model, x: torch.Tensor, sigma: float, mask_space: str, vae, **strategies) -> JacobianProducts:
    """Build the Jacobian products at x, through the VAE decoder when the mask acts on the decoded image."""
    denoise = space.differentiable_denoise
    output_shape = None
    if mask_space != "latent":
        denoise = decoded_denoiser(model, vae, denoise)
        output_shape = decoded_shape(vae, tuple(x.shape))[1:]
    return JacobianProducts(denoise, x.to(space.latent.device).float(), sigma, output_shape=output_shape, **strategies)


def _jacobian_context(mask_space: str, vae):
    return contextlib.nullcontext() if mask_space == "latent" else decoder_for_jacobian(vae)


def _clean_latent(model, latent, image, vae) -> torch.Tensor:
    """Return the latent to invert, from a LATENT or from an IMAGE encoded by a VAE (exactly one of the two)."""
    if latent is not None and image is not None:
        raise LocoError("both latent and image are connected; connect one of them")
    if image is not None:
        if vae is None:
            raise LocoError("image is connected but vae is not; connect the VAE that matches the model")
        # Alpha carries no content for the denoiser, so it is dropped, as VAEEncode does.
        samples = vae.encode(image[:, :, :, :3])
    elif latent is not None:
        samples = latent["samples"]
    else:
        raise LocoError("nothing to invert; connect a latent, or an image and a vae")

    if not bool(samples.abs().sum() > 0):
        raise LocoError("the latent to invert is all zeros; encode an image with VAEEncode first")

    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels:
        source = "the vae encodes" if image is not None else "the latent has"
        raise LocoError(
            f"{source} {samples.shape[1]} channels but the model works on {channels}; "
            "use the VAE and latent that belong to the model"
        )
    return samples


class LOCOInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOInvert",
            display_name="LOCO Invert to Edit Level",
            category=CATEGORY,
            description="Carry a clean latent up to the edit noise level with deterministic DDIM (eta 0), "
            "the exact reverse of the schedule the edit nodes decode with.",
            inputs=[
                *_model_inputs(),
                io.Float.Input(
                    "edit_level", default=0.6, min=0.01, max=0.99, step=0.01,
                    tooltip="Noise level as a fraction of diffusion time, 0..1 (1 is pure noise). LOCO edits work best at 0.5 to 0.7.",
                ),
                io.Int.Input("steps", default=40, min=1, max=1000, tooltip="ODE steps from the clean image to the edit level."),
                _cfg_input(),
                io.Latent.Input("latent", optional=True, tooltip="Clean latent of the image to edit, e.g. from VAEEncode. Give this or image and vae."),
                io.Image.Input("image", optional=True, tooltip="Image to edit, encoded with vae; an alpha channel is dropped."),
                io.Vae.Input("vae", optional=True, tooltip="VAE that encodes image."),
            ],
            outputs=[Inversion.Output(display_name="inversion", tooltip="Latents at the edit level with their sigma schedule.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, edit_level, steps, cfg, latent=None, image=None, vae=None) -> io.NodeOutput:
        samples = _clean_latent(model, latent, image, vae)
        if cfg > HIGH_INVERSION_CFG:
            logger.warning("inverting at cfg %.3g; above %.3g the inversion drifts, and cfg 1 is the usual choice", cfg, HIGH_INVERSION_CFG)

        model_sampling = model.get_model_object("model_sampling")
        grid = level_grid(lambda t: float(model_sampling.percent_to_sigma(1.0 - t)), edit_level, steps)
        progress = Progress(steps)

        def task(space):
            return invert(space.denoise, space.latent.float(), grid, on_step=progress.step)

        inverted = run_with_denoiser(model, positive, negative, cfg, samples, grid.flip(0), task)
        return io.NodeOutput(InvertedLatent(_to_output(inverted), grid, float(edit_level), model_fingerprint(model)))


class LOCOFindDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOFindDirections",
            display_name="LOCO Find Edit Directions",
            category=CATEGORY,
            description="Find semantic edit directions inside a mask: the top right singular vectors of the masked "
            "Jacobian of the denoiser at the edit level, with the top directions of the unmasked region projected "
            "out so edits stay local.",
            inputs=[
                *_model_inputs(),
                Inversion.Input("inversion", tooltip="Output of LOCO Invert to Edit Level."),
                io.Mask.Input(
                    "mask", tooltip="Region to edit: white inside. Latent size or image size for mask_space 'latent', "
                    "the decoded image's size for 'decoded image'.",
                ),
                io.Int.Input("rank", default=5, min=1, max=64, tooltip="Number of edit directions to find."),
                io.Int.Input("null_rank", default=5, min=0, max=64, tooltip="Directions of the unmasked region to project out; 0 turns locality off."),
                io.Int.Input("max_rounds", default=20, min=2, max=200, tooltip="Most subspace-iteration rounds; each costs one batched JVP and one VJP."),
                io.Float.Input(
                    "tolerance", default=1e-3, min=1e-8, max=0.5, step=1e-4,
                    tooltip="Stop when the sine of the largest principal angle between two rounds' subspaces falls below this.",
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip="Seed of the random start block."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the inverted batch to analyse."),
                io.Combo.Input("jvp_strategy", options=list(JVP_STRATEGIES), default="auto", tooltip="How Jacobian-vector products are computed; auto falls back in order and logs why."),
                _cfg_input(),
                io.Combo.Input(
                    "vjp_strategy", options=list(VJP_STRATEGIES), default="auto", optional=True,
                    tooltip="How vector-Jacobian products are computed: reverse mode, or symmetric (J in place of J^T, "
                    "exact for an ideal denoiser). auto uses reverse and falls back to symmetric with a warning.",
                ),
                *_mask_space_inputs(),
            ],
            outputs=[
                Directions.Output(display_name="directions", tooltip="The edit directions with their singular values and leakage."),
                io.Image.Output(display_name="preview", tooltip="The top directions (first three latent channels) with singular values."),
                io.String.Output(display_name="report", tooltip="JSON: singular values, leakage before and after projection, convergence."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, inversion, mask, rank, null_rank, max_rounds, tolerance, seed, batch_index, jvp_strategy, cfg, vjp_strategy="auto", mask_space="latent", vae=None) -> io.NodeOutput:
        _check_model("the inversion", inversion.model_fingerprint, model)
        x = inversion.image(batch_index)
        weights = _mask_weights(mask, inversion, batch_index, mask_space, vae)
        progress = Progress(max_rounds * (2 if null_rank else 1))
        fingerprint = model_fingerprint(model)

        def task(space):
            with _jacobian_context(mask_space, vae):
                products = _jacobian_products(
                    space, model, x, inversion.sigma, mask_space, vae, jvp_strategy=jvp_strategy, vjp_strategy=vjp_strategy
                )
                return find_directions(
                    products, weights.to(space.latent.device), rank, null_rank,
                    max_rounds=max_rounds, tolerance=tolerance, seed=seed,
                    model_fingerprint=fingerprint, on_round=progress.step,
                )

        found = run_with_denoiser(model, positive, negative, cfg, _empty_latent(inversion, 1), inversion.grid.flip(0), task, reverse_mode=True)
        found.parameters.update({"edit_level": inversion.edit_level, "batch_index": batch_index, "cfg": cfg, "mask_space": mask_space})
        found = _directions_to_output(found)
        return io.NodeOutput(found, directions_preview(found.vectors, found.singular_values), _report(found))


def _directions_to_output(directions: DirectionSet) -> DirectionSet:
    for name in ("vectors", "singular_values", "mask", "leakage_before", "leakage_after", "null_vectors"):
        value = getattr(directions, name)
        if value is not None:
            setattr(directions, name, _to_output(value).float())
    return directions


def _edit_inputs() -> list:
    return [
        *_model_inputs(),
        Inversion.Input("inversion", tooltip="Output of LOCO Invert to Edit Level: the latents to edit."),
        Directions.Input("directions", tooltip="Edit directions from LOCO Find Edit Directions, Transfer, Compose or Text Direction."),
        io.Int.Input("direction_index", default=0, min=0, max=63, tooltip="Which direction to apply (0 is the strongest)."),
    ]


def _weights_input() -> io.String.Input:
    return io.String.Input(
        "direction_weights", default="", optional=True,
        tooltip="Optional weighted sum of directions as index:weight pairs, e.g. '0:1.0, 2:-0.5'; overrides direction_index.",
    )


class LOCOApplyEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOApplyEdit",
            display_name="LOCO Apply Edit",
            category=CATEGORY,
            description="Move the inverted latents along an edit direction and decode them with the same "
            "deterministic sampler; strength 0 reproduces the plain decode. Direction signs are arbitrary, "
            "so try both signs.",
            inputs=[
                *_edit_inputs(),
                io.Float.Input("strength", default=4.0, min=-1000.0, max=1000.0, step=0.1, tooltip="Signed step along the unit direction, in latent units."),
                _cfg_input(),
                _weights_input(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Edited clean latents; decode with VAEDecode.")],
        )

    @classmethod
    def validate_inputs(cls, direction_weights=None) -> bool | str:
        # Naming only this input keeps ComfyUI's own range checks on the others.
        return _weights_syntax_error(direction_weights)

    @classmethod
    def execute(cls, model, positive, negative, inversion, directions, direction_index, strength, cfg, direction_weights="") -> io.NodeOutput:
        _check_shapes(directions, inversion)
        _check_model("the directions", directions.model_fingerprint, model)
        vector = _edit_vector(directions, direction_index, direction_weights or "")
        progress = Progress(len(inversion.grid) - 1)

        def task(space):
            samples = apply_direction(inversion.samples.to(space.latent.device), vector, strength)
            return decode(space.denoise, samples, inversion.grid, on_step=progress.step)

        decoded = run_with_denoiser(model, positive, negative, cfg, _empty_latent(inversion), inversion.grid.flip(0), task)
        return io.NodeOutput({"samples": _to_output(model_space_to_latent(model, decoded))})


class LOCOSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOSweep",
            display_name="LOCO Sweep Direction",
            category=CATEGORY,
            description="Decode one image moved along a direction at evenly spaced strengths from -max_strength "
            "to +max_strength, both signs because singular-vector signs are arbitrary. Decode the batch to see the grid.",
            inputs=[
                *_edit_inputs(),
                io.Float.Input("max_strength", default=6.0, min=0.0, max=1000.0, step=0.1, tooltip="Largest step along the unit direction, in latent units."),
                io.Int.Input("count", default=5, min=2, max=64, tooltip="Number of strengths; an odd count includes strength 0."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the inverted batch to sweep."),
                _cfg_input(),
                _weights_input(),
                io.Vae.Input("vae", optional=True, tooltip="When connected, the sweep is also decoded into one image grid."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="One latent per strength, from -max_strength to +max_strength."),
                io.String.Output(display_name="strengths", tooltip="The strengths used, in batch order, as JSON."),
                io.Image.Output(display_name="grid", tooltip="The decoded sweep side by side, left to right; empty (1x1 black) without a vae."),
            ],
        )

    @classmethod
    def validate_inputs(cls, direction_weights=None) -> bool | str:
        # Naming only this input keeps ComfyUI's own range checks on the others.
        return _weights_syntax_error(direction_weights)

    @classmethod
    def execute(cls, model, positive, negative, inversion, directions, direction_index, max_strength, count, batch_index, cfg, direction_weights="", vae=None) -> io.NodeOutput:
        _check_shapes(directions, inversion)
        _check_model("the directions", directions.model_fingerprint, model)
        vector = _edit_vector(directions, direction_index, direction_weights or "")
        strengths = torch.linspace(-max_strength, max_strength, count)
        start = inversion.image(batch_index)
        progress = Progress(len(inversion.grid) - 1)

        def task(space):
            device = space.latent.device
            moved = torch.cat([apply_direction(start.to(device), vector, float(s)) for s in strengths])
            return decode(space.denoise, moved, inversion.grid, on_step=progress.step)

        decoded = run_with_denoiser(model, positive, negative, cfg, _empty_latent(inversion, count), inversion.grid.flip(0), task)
        latent = {"samples": _to_output(model_space_to_latent(model, decoded))}
        grid = torch.zeros(1, 1, 1, 3)
        if vae is not None:
            images = vae.decode(latent["samples"])
            images = images.reshape(-1, *images.shape[-3:])
            grid = torch.cat(list(images), dim=1)[None]
        return io.NodeOutput(latent, json.dumps([round(float(s), 6) for s in strengths]), _to_output(grid))


class LOCOTransferDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOTransferDirections",
            display_name="LOCO Transfer Directions",
            category=CATEGORY,
            description="Carry directions found on one image onto another: normalise them and project out the "
            "target's own unmasked-region directions, so the edit stays local on the new image.",
            inputs=[
                *_model_inputs(),
                Directions.Input("directions", tooltip="Directions found on the source image."),
                Inversion.Input("inversion", tooltip="The target image, inverted to the same edit level."),
                io.Int.Input("null_rank", default=5, min=0, max=64, tooltip="Target directions of the unmasked region to project out; 0 only normalises."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip="Seed of the random start block."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the target batch."),
                _cfg_input(),
                io.Mask.Input("mask", optional=True, tooltip="Region on the target; defaults to the mask the directions were found with."),
                io.Vae.Input("vae", optional=True, tooltip="The model's VAE; needed for directions found with mask_space 'decoded image'."),
                io.Int.Input(
                    "max_rounds", default=20, min=2, max=200, optional=True,
                    tooltip="Most subspace-iteration rounds for the target's unmasked-region directions.",
                ),
            ],
            outputs=[Directions.Output(display_name="directions", tooltip="The directions adapted to the target image.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, directions, inversion, null_rank, seed, batch_index, cfg, mask=None, vae=None, max_rounds=20) -> io.NodeOutput:
        _check_shapes(directions, inversion)
        _check_model("the directions", directions.model_fingerprint, model)
        x = inversion.image(batch_index)
        mask_space = directions.parameters.get("mask_space", "latent")
        _check_mask_space(mask_space, vae)
        weights = directions.mask if mask is None else _mask_weights(mask, inversion, batch_index, mask_space, vae)
        progress = Progress(max_rounds)

        def task(space):
            device = space.latent.device
            with _jacobian_context(mask_space, vae):
                target = _jacobian_products(space, model, x, inversion.sigma, mask_space, vae)
                return transfer(
                    directions.vectors.to(device), target, weights.to(device),
                    null_rank=null_rank, max_rounds=max_rounds, seed=seed, on_round=progress.step,
                )

        vectors, moved_leakage = run_with_denoiser(model, positive, negative, cfg, _empty_latent(inversion, 1), inversion.grid.flip(0), task, reverse_mode=True)
        moved = DirectionSet(
            vectors=_to_output(vectors).float(),
            singular_values=directions.singular_values,
            sigma=inversion.sigma,
            mask=_to_output(weights).float(),
            model_fingerprint=model_fingerprint(model),
            parameters={
                **directions.parameters,
                "transferred": {"null_rank": null_rank, "max_rounds": max_rounds, "seed": seed, "batch_index": batch_index},
            },
            leakage_after=_to_output(moved_leakage).float(),
        )
        return io.NodeOutput(moved)


class LOCOComposeDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOComposeDirections",
            display_name="LOCO Compose Directions",
            category=CATEGORY,
            description="Make one direction as a weighted sum of directions from one or two sets. Indices count "
            "the first set's directions, then the second's. The sum is not normalised, so weights act as strengths.",
            inputs=[
                Directions.Input("directions", tooltip="First direction set."),
                io.String.Input("weights", default="0:1.0, 1:1.0", tooltip="index:weight pairs over the joined sets, e.g. '0:1.0, 5:-0.5'."),
                Directions.Input("directions_b", optional=True, tooltip="Optional second set, found on a latent of the same size."),
            ],
            outputs=[Directions.Output(display_name="directions", tooltip="A set holding the one composed direction.")],
        )

    @classmethod
    def validate_inputs(cls, weights=None) -> bool | str:
        return _weights_syntax_error(weights, required=True)

    @classmethod
    def execute(cls, directions, weights, directions_b=None) -> io.NodeOutput:
        vectors = [v for v in directions.vectors]
        if directions_b is not None:
            if directions_b.shape != directions.shape:
                raise LocoError(f"the two direction sets have latent shapes {directions.shape} and {directions_b.shape}; compose sets of one size")
            vectors += [v for v in directions_b.vectors]
        parsed = _parse_weights(weights, len(vectors))
        combined = compose([vectors[i] for i in parsed], list(parsed.values()))
        composed = DirectionSet(
            vectors=combined[None],
            singular_values=combined.norm().reshape(1),
            sigma=directions.sigma,
            mask=directions.mask,
            model_fingerprint=directions.model_fingerprint,
            parameters={"composed_from": {str(i): w for i, w in parsed.items()}, "weights": weights},
        )
        return io.NodeOutput(composed)


class LOCOTextDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOTextDirection",
            display_name="LOCO Text Direction (T-LOCO)",
            category=CATEGORY,
            description="An edit direction supervised by an edit prompt: the masked change the edit conditioning "
            "predicts, pulled back through the edit denoiser's Jacobian, with the source model's unmasked-region "
            "directions projected out. Apply it with the source conditioning.",
            inputs=[
                *_model_inputs(),
                io.Conditioning.Input("edit_positive", tooltip="Conditioning of the edit prompt, e.g. 'a smiling face'."),
                Inversion.Input("inversion", tooltip="Output of LOCO Invert to Edit Level."),
                io.Mask.Input("mask", tooltip="Region to edit: white inside. Sizes as for LOCO Find Edit Directions."),
                io.Int.Input("null_rank", default=5, min=0, max=64, tooltip="Source directions of the unmasked region to project out; 0 turns locality off."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip="Seed of the random start block."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the inverted batch."),
                _cfg_input(),
                *_mask_space_inputs(),
            ],
            outputs=[Directions.Output(display_name="directions", tooltip="A set holding the one text-supervised direction.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, edit_positive, inversion, mask, null_rank, seed, batch_index, cfg, mask_space="latent", vae=None) -> io.NodeOutput:
        x = inversion.image(batch_index)
        weights = _mask_weights(mask, inversion, batch_index, mask_space, vae)
        progress = Progress(20 + 2)
        grid = inversion.grid.flip(0)
        latent = _empty_latent(inversion, 1)

        # ComfyUI's denoiser is valid only inside one sampling run, so the
        # source and edit denoisers take turns: source first (value and null
        # space), then edit (value and pull-back), then source (leakage).
        def source_task(space):
            with _jacobian_context(mask_space, vae):
                products = _jacobian_products(space, model, x, inversion.sigma, mask_space, vae)
                null = None
                if null_rank > 0:
                    null = masked_subspace(products, 1 - weights.to(space.latent.device), null_rank, seed=seed, on_round=progress.step).vectors
                return products.value(), null

        source_value, null_vectors = run_with_denoiser(model, positive, negative, cfg, latent, grid, source_task, reverse_mode=True)

        def edit_task(space):
            device = space.latent.device
            with _jacobian_context(mask_space, vae):
                products = _jacobian_products(space, model, x, inversion.sigma, mask_space, vae)
                change = text_change(source_value.to(device), products.value(), weights.to(device))
                progress.step()
                return pull_back(products, change, None if null_vectors is None else null_vectors.to(device))

        vector = run_with_denoiser(model, edit_positive, negative, cfg, latent, grid, edit_task, reverse_mode=True)

        def leakage_task(space):
            with _jacobian_context(mask_space, vae):
                products = _jacobian_products(space, model, x, inversion.sigma, mask_space, vae)
                progress.step()
                return leakage(products, vector.to(space.latent.device), weights.to(space.latent.device))

        vector_leakage = run_with_denoiser(model, positive, negative, cfg, latent, grid, leakage_task)
        found = DirectionSet(
            vectors=_to_output(vector).float(),
            singular_values=torch.ones(1),
            sigma=inversion.sigma,
            mask=_to_output(weights).float(),
            model_fingerprint=model_fingerprint(model),
            parameters={
                "method": "t-loco", "null_rank": null_rank, "seed": seed, "batch_index": batch_index, "cfg": cfg,
                "mask_space": mask_space,
            },
            leakage_after=_to_output(vector_leakage).float(),
        )
        return io.NodeOutput(found)


class LOCOPosteriorMean(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LOCOPosteriorMean",
            display_name="LOCO Posterior Mean",
            category=CATEGORY,
            description="Noise a latent to the first sigma of a schedule with a seed, exactly as the samplers do, "
            "and return the denoiser's posterior-mean (x0) prediction there: the function whose Jacobian LOCO "
            "analyses, through the same route.",
            inputs=[
                *_model_inputs(),
                io.Latent.Input("latent", tooltip="Clean latent, or an empty latent for pure noise."),
                io.Sigmas.Input("sigmas", tooltip="Noise schedule; its first sigma is used."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Seed of the added noise."),
                _cfg_input(),
            ],
            outputs=[io.Latent.Output(display_name="denoised", tooltip="The x0 prediction at that sigma.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, sigmas, noise_seed, cfg) -> io.NodeOutput:
        import comfy.sample

        if sigmas.numel() < 1 or float(sigmas[0]) <= 0:
            raise LocoError("sigmas must start with a positive noise level; connect a scheduler output")
        samples = latent["samples"]
        noise = comfy.sample.prepare_noise(samples, noise_seed, latent.get("batch_index"))
        sigma = float(sigmas[0])

        def task(space):
            model_sampling = space.model_sampling
            sigma_max = float(model_sampling.sigma_max)
            at_max = abs(sigma - sigma_max) <= 1e-5 * sigma_max or sigma > sigma_max
            device = space.latent.device
            sigma_tensor = torch.tensor([sigma], device=device)
            noisy = model_sampling.noise_scaling(sigma_tensor, noise.to(device), space.latent, at_max)
            return space.denoise(noisy, sigma_tensor.expand(noisy.shape[0]))

        denoised = run_with_denoiser(model, positive, negative, cfg, samples, sigmas, task, seed=noise_seed)
        return io.NodeOutput({"samples": _to_output(model_space_to_latent(model, denoised))})


NODES = [
    LOCOInvert,
    LOCOFindDirections,
    LOCOApplyEdit,
    LOCOSweep,
    LOCOTransferDirections,
    LOCOComposeDirections,
    LOCOTextDirection,
    LOCOPosteriorMean,
]
