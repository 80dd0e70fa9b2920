"""Pictures drawn by this project for a benign image-question utility check: one coloured shape on white."""

from __future__ import annotations

import itertools

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 20),
    "black": (10, 10, 10),
    "purple": (130, 40, 170),
}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: str, size: int = 336) -> Image.Image:
    """A `colour` `shape` centred on a white square canvas."""
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    low, high = size // 4, 3 * size // 4
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((low, low, high, high), fill=fill)
    elif shape == "square":
        pen.rectangle((low, low, high, high), fill=fill)
    else:
        pen.polygon([(size // 2, low), (low, high), (high, high)], fill=fill)
    return image


def picture_questions(count: int) -> tuple[list[str], list[str], list[Image.Image]]:
    """Questions, one-word answers and pictures: the colour and the shape of each drawing, in turn."""
    questions, answers, images = [], [], []
    for shape, colour in itertools.cycle(itertools.product(SHAPES, COLOURS)):
        if len(questions) >= count:
            break
        picture = draw(shape, colour)
        questions += [
            "What colour is the shape in this picture? Answer with one word.",
            "What shape is drawn in this picture? Answer with one word.",
        ]
        answers += [colour, shape]
        images += [picture, picture]
    return questions[:count], answers[:count], images[:count]
