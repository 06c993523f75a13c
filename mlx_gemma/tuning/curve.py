"""The loss curve next to the adapters, drawn with Pillow (a run-time dependency already;
matplotlib is not)."""

from __future__ import annotations

from typing import Optional

from PIL import Image, ImageDraw

SIZE, MARGIN = (640, 400), 48
COLOURS = {"train": (31, 119, 180), "validation": (255, 127, 14)}


def loss_curve(reports: list) -> Optional[Image.Image]:
    """Train and validation loss against iteration (None before the first report)."""
    series = {"train": [(r.iteration, r.train_loss) for r in reports if r.train_loss is not None],
              "validation": [(r.iteration, r.val_loss) for r in reports if r.val_loss is not None]}
    points = [p for s in series.values() for p in s]
    if not points:
        return None
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    (x0, x1), (y0, y1) = _span([p[0] for p in points]), _span([p[1] for p in points])
    w, h = SIZE[0] - 2 * MARGIN, SIZE[1] - 2 * MARGIN

    def at(x, y):
        return MARGIN + (x - x0) / (x1 - x0) * w, MARGIN + (y1 - y) / (y1 - y0) * h

    draw.rectangle([MARGIN, MARGIN, MARGIN + w, MARGIN + h], outline="black")
    for value, (px, py) in ((y1, at(x0, y1)), (y0, at(x0, y0))):
        draw.text((4, py - 6), f"{value:.3g}", fill="black")
    draw.text((MARGIN, SIZE[1] - MARGIN + 8), f"iteration {x0:g}", fill="black")
    draw.text((SIZE[0] - MARGIN - 90, SIZE[1] - MARGIN + 8), f"iteration {x1:g}", fill="black")
    for k, (name, pts) in enumerate(series.items()):
        xy = [at(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[name], width=2)
        for px, py in xy:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=COLOURS[name])
        draw.text((MARGIN + 8, MARGIN + 8 + 14 * k), f"{name} loss", fill=COLOURS[name])
    return image


def _span(values: list) -> tuple[float, float]:
    low, high = min(values), max(values)
    return (low, high) if high > low else (low - 1, high + 1)
