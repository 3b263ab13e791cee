"""Preview images for LOCO directions."""

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

TILE_SIZE = 128
LABEL_HEIGHT = 18


def directions_preview(vectors: torch.Tensor, singular_values: torch.Tensor, count: int = 5) -> torch.Tensor:
    """Draw up to ``count`` directions side by side, labelled with their singular values, as one IMAGE [1, H, W, 3].

    Each direction shows its first three latent channels (fewer are repeated)
    with zero at mid grey and the largest magnitude at black or white.
    """
    tile_count = min(count, vectors.shape[0])
    tiles = []
    for index in range(tile_count):
        tiles.append(_tile(vectors[index].float().cpu(), index, float(singular_values[index])))
    strip = Image.new("RGB", (TILE_SIZE * tile_count, TILE_SIZE + LABEL_HEIGHT), "black")
    for index, tile in enumerate(tiles):
        strip.paste(tile, (index * TILE_SIZE, 0))
    array = torch.frombuffer(bytearray(strip.tobytes()), dtype=torch.uint8).reshape(strip.height, strip.width, 3)
    return (array.float() / 255.0)[None]


def _tile(vector: torch.Tensor, index: int, singular_value: float) -> Image.Image:
    channels = vector.shape[0]
    rgb = vector[:3] if channels >= 3 else vector[:1].expand(3, -1, -1)
    scale = float(rgb.abs().max()) or 1.0
    rgb = (0.5 + 0.5 * rgb / scale).clamp(0, 1)
    rgb = F.interpolate(rgb[None], size=(TILE_SIZE, TILE_SIZE), mode="nearest")[0]
    pixels = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()

    tile = Image.new("RGB", (TILE_SIZE, TILE_SIZE + LABEL_HEIGHT), "black")
    tile.paste(Image.fromarray(pixels), (0, 0))
    ImageDraw.Draw(tile).text((4, TILE_SIZE + 3), f"{index}: s={singular_value:.3g}", fill="white")
    return tile
