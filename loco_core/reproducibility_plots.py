"""Pictures of a reproducibility comparison, drawn with PIL.

Every function returns one picture as a ``[1, H, W, 3]`` float tensor in
0..1 (ComfyUI's IMAGE layout), so the glue can hand it on unchanged.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MATCHED_COLOUR = (31, 119, 180)
MISMATCHED_COLOUR = (255, 127, 14)
THRESHOLD_COLOUR = (200, 30, 30)


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow >= 10.1 ships a scalable default font; older releases have one fixed size.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _to_image_tensor(picture: Image.Image) -> torch.Tensor:
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)


def _to_uint8(image_chw: torch.Tensor) -> np.ndarray:
    array = image_chw.detach().to(torch.float32).clamp(0.0, 1.0).cpu()
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    return (array[:3].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def heat_colour(value: float, low: float, high: float) -> tuple[int, int, int]:
    """Map ``value`` in ``low..high`` to a white-to-blue colour."""
    span = high - low if high > low else 1.0
    fraction = min(max((value - low) / span, 0.0), 1.0)
    white, blue = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(round(channel)) for channel in white + fraction * (blue - white))


def render_heatmap(
    matrix: torch.Tensor,
    labels: list[str],
    title: str,
    low: float = 0.0,
    high: float = 1.0,
    cell_size: int = 72,
) -> torch.Tensor:
    """Draw a square matrix as a heatmap with its value printed in every cell."""
    count = matrix.shape[0]
    if matrix.shape != (count, count) or len(labels) != count:
        raise ValueError(f"heatmap needs a square matrix and one label per row, got {tuple(matrix.shape)} and {len(labels)}")
    font, title_font = _font(14), _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(_text_size(probe, label, font)[0] for label in labels) + 16
    title_height = 32
    width = label_width + count * cell_size + 8
    height = title_height + count * cell_size + 28
    picture = Image.new("RGB", (max(width, _text_size(probe, title, title_font)[0] + 16), height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    draw.text((8, 8), title, fill=TEXT, font=title_font)

    for row in range(count):
        top = title_height + row * cell_size
        draw.text((8, top + cell_size // 2 - 7), labels[row], fill=TEXT, font=font)
        for column in range(count):
            left = label_width + column * cell_size
            value = float(matrix[row, column])
            colour = heat_colour(value, low, high)
            draw.rectangle([left, top, left + cell_size - 2, top + cell_size - 2], fill=colour)
            text = f"{value:.2f}"
            text_width, text_height = _text_size(draw, text, font)
            dark_cell = sum(colour) < 3 * 140
            draw.text(
                (left + (cell_size - text_width) // 2, top + (cell_size - text_height) // 2 - 2),
                text,
                fill=(255, 255, 255) if dark_cell else TEXT,
                font=font,
            )

    for column in range(count):
        text = labels[column]
        text_width, _ = _text_size(draw, text, font)
        left = label_width + column * cell_size + (cell_size - text_width) // 2
        draw.text((max(left, label_width + column * cell_size), title_height + count * cell_size + 6), text, fill=TEXT, font=font)
    return _to_image_tensor(picture)


def render_histogram(
    matched: torch.Tensor,
    mismatched: torch.Tensor,
    threshold: float,
    title: str,
    bins: int = 30,
    width: int = 640,
    height: int = 360,
) -> torch.Tensor:
    """Draw the matched and mismatched similarity distributions (each normalised to unit area) and the threshold."""
    matched = matched.flatten().to(torch.float64).cpu()
    mismatched = mismatched.flatten().to(torch.float64).cpu()
    if matched.numel() == 0 or mismatched.numel() == 0:
        raise ValueError("histogram needs matched and mismatched similarities")
    low = min(float(matched.min()), float(mismatched.min()), threshold)
    high = max(float(matched.max()), float(mismatched.max()), threshold)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    matched_density = torch.histc(matched, bins=bins, min=low, max=high) / matched.numel()
    mismatched_density = torch.histc(mismatched, bins=bins, min=low, max=high) / mismatched.numel()
    peak = float(max(matched_density.max(), mismatched_density.max()))

    font, title_font = _font(13), _font(16)
    picture = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    left, right, top, bottom = 56, width - 16, 40, height - 44
    draw.text((8, 8), title, fill=TEXT, font=title_font)
    draw.line([left, bottom, right, bottom], fill=TEXT)
    draw.line([left, top, left, bottom], fill=TEXT)

    def x_of(value: float) -> float:
        return left + (value - low) / (high - low) * (right - left)

    bar_width = (right - left) / bins
    for index in range(bins):
        x0 = left + index * bar_width
        for density, colour, offset in (
            (mismatched_density[index], MISMATCHED_COLOUR, 0.0),
            (matched_density[index], MATCHED_COLOUR, 0.5),
        ):
            bar_height = float(density) / peak * (bottom - top) if peak > 0 else 0.0
            draw.rectangle(
                [x0 + offset * bar_width, bottom - bar_height, x0 + (offset + 0.5) * bar_width - 1, bottom],
                fill=colour,
            )

    threshold_x = x_of(threshold)
    draw.line([threshold_x, top, threshold_x, bottom], fill=THRESHOLD_COLOUR, width=2)
    draw.text((threshold_x + 4, top), f"threshold {threshold:.3f}", fill=THRESHOLD_COLOUR, font=font)
    for value in (low, (low + high) / 2, high):
        text = f"{value:.2f}"
        text_width, _ = _text_size(draw, text, font)
        draw.text((x_of(value) - text_width / 2, bottom + 4), text, fill=TEXT, font=font)
    draw.text((left, height - 20), "similarity", fill=TEXT, font=font)

    legend = (
        (MATCHED_COLOUR, f"matched seeds (n={matched.numel()})"),
        (MISMATCHED_COLOUR, f"mismatched seeds (n={mismatched.numel()})"),
    )
    for line, (colour, text) in enumerate(legend):
        y = top + 18 + line * 18
        draw.rectangle([left + 8, y + 2, left + 20, y + 12], fill=colour)
        draw.text((left + 26, y), text, fill=TEXT, font=font)
    return _to_image_tensor(picture)


def render_image_grid(
    rows: list[torch.Tensor],
    row_labels: list[str],
    column_labels: list[str],
    cell_size: int = 64,
) -> torch.Tensor:
    """Draw image rows (each ``[S, C, H, W]`` in 0..1, equal S) as a labelled grid, one column per seed."""
    if not rows or len(rows) != len(row_labels):
        raise ValueError(f"grid needs one label per row, got {len(rows)} rows and {len(row_labels)} labels")
    columns = rows[0].shape[0]
    if any(row.shape[0] != columns for row in rows) or len(column_labels) != columns:
        raise ValueError("every grid row needs the same number of images and one label per column")
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(_text_size(probe, label, font)[0] for label in row_labels) + 12
    header = 20
    picture = Image.new("RGB", (label_width + columns * (cell_size + 2), header + len(rows) * (cell_size + 2)), BACKGROUND)
    draw = ImageDraw.Draw(picture)

    for column, label in enumerate(column_labels):
        draw.text((label_width + column * (cell_size + 2) + 2, 4), label, fill=TEXT, font=font)
    for row_index, (row, label) in enumerate(zip(rows, row_labels)):
        top = header + row_index * (cell_size + 2)
        draw.text((4, top + cell_size // 2 - 6), label, fill=TEXT, font=font)
        for column in range(columns):
            tile = Image.fromarray(_to_uint8(row[column])).resize((cell_size, cell_size), Image.NEAREST)
            picture.paste(tile, (label_width + column * (cell_size + 2), top))
    return _to_image_tensor(picture)
