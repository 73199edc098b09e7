"""The "synthetic web": image-caption pairs and short-answer VQA for aligning a VLM (``midtrain align``).

LLaVA aligns a vision tower and a language model on web images with captions (stage 1) and
visual instructions (stage 2). No web data can be downloaded here, so the project draws its own:
plain pictures of the kinds a web corpus has, each with a caption and a question whose answer is
one word, so exact-match accuracy is well defined. Nothing here is a robot frame or a tabletop
scene (the seed papers' base VLMs saw web data, not robot data).

Kinds (:data:`WEB_KINDS`) and the answers each question kind takes (:data:`ANSWERS`; chance is one
over their number):

- ``colour``, ``shape``, ``position``, ``size``, ``texture``: one drawn shape on a plain light
  background, every attribute drawn independently; the question asks about one of them, so the
  model must look at the asked attribute. Position is the side of the image the shape sits at.
- ``count``: 1-6 non-overlapping shapes of one colour and kind.
- ``word``: one word rendered in large letters.
- ``chart``: a bar chart of 3-4 bars of distinct colours; which colour the tallest bar has.
- ``scene``: a drawn landscape (house, tree, hills) by day, at sunset or at night.

Sample ``i`` of kind ``k`` in split ``s`` comes from ``numpy.random.default_rng([WEB_SALT, seed,
split, crc32(k), i])``; the data engine's pool (``sim pool``) draws from
``default_rng([seed, crc32(source), i])``, a different seed sequence, so no sample of one is a
sample of the other whatever the seeds; the ``train`` and ``heldout`` splits are disjoint the
same way.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WEB_SALT = 0x3EB0A11  # "web align": keeps every web seed sequence apart from sim pool's
SPLITS = {"train": 0, "heldout": 1}

COLOURS = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (235, 205, 25), "green": (40, 150, 55),
    "blue": (35, 75, 215), "purple": (130, 50, 175), "pink": (240, 120, 190), "black": (25, 25, 25),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "cross")
POSITIONS = ("top", "bottom", "left", "right")
SIZES = ("small", "medium", "large")
TEXTURES = ("solid", "striped", "dotted", "checkered")
COUNTS = ("1", "2", "3", "4", "5", "6")
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "car", "moon", "cake", "boat", "star")
TIMES = ("day", "sunset", "night")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}

ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS, "size": SIZES, "texture": TEXTURES,
    "count": COUNTS, "word": WORDS, "chart": tuple(COLOURS)[:6], "scene": TIMES,
}  # fmt: skip
WEB_KINDS: tuple[str, ...] = tuple(ANSWERS)
HEADLINE_KINDS = ("colour", "shape", "count", "position")  # the mean accuracy is over these

QUESTIONS = {
    "colour": ("What colour is the shape?", "What is the colour of the shape?"),
    "shape": ("What shape is shown?", "What kind of shape is in the image?"),
    "position": ("On which side of the image is the shape: top, bottom, left or right?",
                 "Where is the shape: top, bottom, left or right?"),
    "size": ("Is the shape small, medium or large?", "How big is the shape: small, medium or large?"),
    "texture": ("Is the shape solid, striped, dotted or checkered?", "What pattern fills the shape?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "word": ("What word is written in the image?", "What does the text say?"),
    "chart": ("What colour is the tallest bar?", "Which colour is the highest bar in the chart?"),
    "scene": ("What time of day is it: day, sunset or night?", "Is it day, sunset or night in this picture?"),
}  # fmt: skip
SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA instruction
CAPTION_PROMPTS = ("Describe the image briefly.", "Give a short caption of the image.",
                   "What is in this picture?", "Write a one-sentence description of the image.")  # fmt: skip


@dataclass
class WebSample:
    """One picture: ``image`` RGB, its ``caption``, one question of kind ``kind`` with its one-word
    ``answer``, and the drawn ``attributes`` (what a linear probe predicts)."""

    image: Image.Image
    kind: str
    caption: str
    question: str
    answer: str
    attributes: dict[str, str] = field(default_factory=dict)


def web_rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``kind`` in ``split`` (see the module docstring)."""
    return np.random.default_rng([WEB_SALT, seed, SPLITS[split], zlib.crc32(kind.encode()), index])


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _jitter(rng, rgb, amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _background(rng, size: int) -> Image.Image:
    grey = int(rng.integers(205, 256))
    tint = rng.integers(-12, 13, size=3)
    return Image.new("RGB", (size, size), tuple(int(np.clip(grey + t, 0, 255)) for t in tint))


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.97, cy + r * 0.75), (cx - r * 0.97, cy + r * 0.75)], fill=255)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + rr * np.cos(a), cy - rr * np.sin(a)) for a, rr in zip(angles, radii)], fill=255)
    else:  # cross
        w = r * 0.34
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    return mask


def _texture_layer(texture: str, colour, background: Image.Image, r: float) -> Image.Image:
    """The shape's fill: its colour, or the colour patterned over the background."""
    size = background.size[0]
    if texture == "solid":
        return Image.new("RGB", (size, size), colour)
    layer = background.copy()
    draw = ImageDraw.Draw(layer)
    step = max(6, int(r / 3))
    if texture == "striped":
        for x in range(-size, size, step):
            draw.line([(x, 0), (x + size, size)], fill=colour, width=max(2, step // 2))
    elif texture == "dotted":
        dot = max(2, step // 3)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=colour)
    else:  # checkered
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2 == 0:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)
    return layer


RADII = {"small": (0.06, 0.08), "medium": (0.12, 0.15), "large": (0.2, 0.23)}  # of the image side


def object_sample(rng: np.random.Generator, size: int, kind: str) -> WebSample:
    """One shape with independently drawn colour, kind, side, size and fill; a question about ``kind``."""
    colour, shape, position, scale, texture = (_pick(rng, tuple(COLOURS)), _pick(rng, SHAPES), _pick(rng, POSITIONS),
                                               _pick(rng, SIZES), _pick(rng, TEXTURES))  # fmt: skip
    image = _background(rng, size)
    r = size * rng.uniform(*RADII[scale])
    margin = size * 0.25  # the shape's centre sits in the outer quarter of its side, centred along it
    along = size / 2 + rng.uniform(-0.12, 0.12) * size
    across = margin + rng.uniform(-0.03, 0.03) * size
    cx, cy = {"top": (along, across), "bottom": (along, size - across), "left": (across, along),
              "right": (size - across, along)}[position]  # fmt: skip
    rgb = _jitter(rng, COLOURS[colour])
    mask = _shape_mask(shape, cx, cy, r, size)
    plain = image.copy()
    image.paste(Image.new("RGB", (size, size), rgb), (0, 0), mask)
    if texture != "solid":  # the pattern inside a thin solid rim, which keeps the outline (the kind) visible
        inner = mask.filter(ImageFilter.MinFilter(5))
        image.paste(_texture_layer(texture, rgb, plain, r), (0, 0), inner)
    fill = "" if texture == "solid" else f"{texture} "
    caption = f"A {scale} {colour} {fill}{shape} at the {position} of the image."
    answer = {"colour": colour, "shape": shape, "position": position, "size": scale, "texture": texture}[kind]
    attributes = {"colour": colour, "shape": shape, "position": position, "size": scale, "texture": texture}
    return WebSample(image, kind, caption, _pick(rng, QUESTIONS[kind]), answer, attributes)


def count_sample(rng: np.random.Generator, size: int) -> WebSample:
    """1-6 non-overlapping shapes of one colour and kind."""
    n = int(rng.integers(1, len(COUNTS) + 1))
    colour, shape = _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES)
    image = _background(rng, size)
    r = size * rng.uniform(0.06, 0.085)
    centres: list[tuple[float, float]] = []
    while len(centres) < n:  # the square is large enough for 6 shapes of this radius; restart on a bad draw
        centres = []
        for _ in range(300):
            c = rng.uniform(r * 1.3, size - r * 1.3, size=2)
            if all((c[0] - x) ** 2 + (c[1] - y) ** 2 > (2.7 * r) ** 2 for x, y in centres):
                centres.append((float(c[0]), float(c[1])))
                if len(centres) == n:
                    break
    rgb = _jitter(rng, COLOURS[colour])
    for cx, cy in centres:
        image.paste(Image.new("RGB", (size, size), rgb), (0, 0), _shape_mask(shape, cx, cy, r, size))
    noun = shape if n == 1 else PLURALS[shape]
    caption = f"{NUMBER_WORDS[n].capitalize()} {colour} {noun} on a plain background."
    attributes = {"count": str(n), "colour": colour, "shape": shape}
    return WebSample(image, "count", caption, _pick(rng, QUESTIONS["count"]), str(n), attributes)


def word_sample(rng: np.random.Generator, size: int) -> WebSample:
    """One word in large letters, dark on light or light on dark."""
    from .pool_sources import _font

    word = _pick(rng, WORDS)
    colour = _pick(rng, ("black", "blue", "red", "green", "purple"))
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    font = _font(_pick(rng, ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf")), int(size * rng.uniform(0.2, 0.27)))
    box = draw.textbbox((0, 0), word, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    x = (size - w) / 2 + rng.uniform(-0.08, 0.08) * size - box[0]
    y = (size - h) / 2 + rng.uniform(-0.15, 0.15) * size - box[1]
    draw.text((x, y), word, font=font, fill=_jitter(rng, COLOURS[colour], 10))
    caption = f'The word "{word}" written in {colour} letters.'
    return WebSample(image, "word", caption, _pick(rng, QUESTIONS["word"]), word, {"word": word})


def chart_sample(rng: np.random.Generator, size: int) -> WebSample:
    """A bar chart of 3-4 bars of distinct colours, one clearly the tallest."""
    n = int(rng.integers(3, 5))
    names = [str(c) for c in rng.choice(ANSWERS["chart"], size=n, replace=False)]
    heights = rng.uniform(0.2, 0.6, size=n)
    top = int(rng.integers(n))
    heights[top] = rng.uniform(0.75, 0.9)
    image = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    base, left, right = size * 0.9, size * 0.1, size * 0.92
    draw.line([(left, size * 0.06), (left, base)], fill=(60, 60, 60), width=2)
    draw.line([(left, base), (right, base)], fill=(60, 60, 60), width=2)
    slot = (right - left) / n
    for i, (name, hgt) in enumerate(zip(names, heights)):
        x0 = left + slot * (i + 0.2)
        draw.rectangle((x0, base - hgt * size * 0.85, x0 + slot * 0.6, base - 1), fill=_jitter(rng, COLOURS[name], 10))
    caption = f"A bar chart with {NUMBER_WORDS[n]} bars; the {names[top]} bar is the tallest."
    return WebSample(image, "chart", caption, _pick(rng, QUESTIONS["chart"]), names[top], {"chart": names[top]})


SKIES = {"day": ((90, 160, 235), (170, 215, 250)), "sunset": ((240, 120, 60), (250, 200, 110)),
         "night": ((10, 15, 45), (35, 40, 85))}  # fmt: skip


def scene_sample(rng: np.random.Generator, size: int) -> WebSample:
    """A drawn landscape (hills, a house and a tree) by day, at sunset or at night."""
    time = _pick(rng, TIMES)
    top, bottom = SKIES[time]
    t = np.linspace(0, 1, size)[:, None, None]
    sky = (np.array(top) * (1 - t) + np.array(bottom) * t).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(sky, (size, size, 3)).copy())
    draw = ImageDraw.Draw(image)
    dim = 0.45 if time == "night" else 1.0
    horizon = size * rng.uniform(0.55, 0.7)
    grass = tuple(int(c * dim) for c in _jitter(rng, (70, 150, 60)))
    draw.ellipse((-size * 0.3, horizon - size * 0.12, size * 0.7, horizon + size * 0.5), fill=grass)
    draw.rectangle((0, horizon, size, size), fill=grass)
    body = (235, 235, 210) if time == "night" else (250, 220, 60) if time == "day" else (250, 110, 40)
    bx, by = rng.uniform(0.15, 0.85) * size, rng.uniform(0.1, 0.3) * size
    br = size * 0.07
    draw.ellipse((bx - br, by - br, bx + br, by + br), fill=body)
    if time == "night":
        for _ in range(int(rng.integers(8, 20))):
            sx, sy = rng.uniform(0, size), rng.uniform(0, horizon * 0.8)
            draw.point((sx, sy), fill=(240, 240, 200))
    hx = rng.uniform(0.15, 0.5) * size
    hw = size * 0.2
    wall = tuple(int(c * dim) for c in _jitter(rng, (200, 170, 130)))
    draw.rectangle((hx, horizon - hw * 0.8, hx + hw, horizon + hw * 0.1), fill=wall)
    draw.polygon([(hx - hw * 0.1, horizon - hw * 0.8), (hx + hw / 2, horizon - hw * 1.3), (hx + hw * 1.1, horizon - hw * 0.8)],
                 fill=tuple(int(c * dim) for c in (160, 50, 40)))  # fmt: skip
    tx = hx + hw * 1.6 + rng.uniform(0, 0.15) * size
    draw.rectangle((tx - size * 0.015, horizon - size * 0.12, tx + size * 0.015, horizon + size * 0.02),
                   fill=tuple(int(c * dim) for c in (110, 70, 40)))  # fmt: skip
    draw.ellipse((tx - size * 0.08, horizon - size * 0.26, tx + size * 0.08, horizon - size * 0.08),
                 fill=tuple(int(c * dim) for c in (40, 120, 45)))  # fmt: skip
    light = {"day": "a sunny day", "sunset": "sunset", "night": "night under the moon and stars"}[time]
    caption = f"A drawing of a house and a tree on a hill at {light}."
    return WebSample(image, "scene", caption, _pick(rng, QUESTIONS["scene"]), time, {"scene": time})


def web_sample(kind: str, rng: np.random.Generator, size: int = 224) -> WebSample:
    """A sample of ``kind`` (one of :data:`WEB_KINDS`) drawn from ``rng`` at ``size`` x ``size`` pixels."""
    if kind in ("colour", "shape", "position", "size", "texture"):
        return object_sample(rng, size, kind)
    return {"count": count_sample, "word": word_sample, "chart": chart_sample, "scene": scene_sample}[kind](rng, size)


def vqa_prompt(question: str) -> str:
    """A VQA question as LLaVA-1.5 asks for short answers."""
    return f"{question}\n{SHORT_ANSWER}"


def chance_accuracy(kind: str) -> float:
    """Exact-match accuracy of guessing uniformly among a kind's answers."""
    return 1.0 / len(ANSWERS[kind])


def caption_record(sid: str, image: str, prompt: str, caption: str) -> dict:
    return {"id": sid, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{prompt}"},
                                                          {"from": "gpt", "value": caption}]}  # fmt: skip


def write_web_corpus(out_dir: Path, sizes: dict[str, int], seed: int = 0, split: str = "train", image_size: int = 224,
                     progress=None) -> dict:  # fmt: skip
    """Draw ``sizes[kind]`` pictures of each kind into ``out_dir``: ``images/<id>.png``, ``captions.json``
    (stage 1: one caption per picture), ``vqa.json`` (stage 2: one short-answer question per picture), both
    LLaVA JSON, and ``corpus.json`` (composition: pictures, answers and chance per kind). Returns the composition.
    ``progress``: an optional wrapper of the kinds' iteration (e.g. a stage's progress bar)."""
    from ..data.images import encode_image
    from ..runs import write_json_atomic

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    captions, questions, kinds = [], [], {}
    items = [(kind, n) for kind, n in sizes.items() if n > 0]
    for kind, n in progress(items) if progress else items:
        answers: dict[str, int] = {}
        for i in range(n):
            rng = web_rng(seed, split, kind, i)
            sample = web_sample(kind, rng, image_size)
            sid = f"web-{split}-{kind}-{i:05d}"
            image = f"images/{sid}.png"
            (out_dir / image).write_bytes(encode_image(sample.image, "PNG"))
            captions.append(caption_record(sid, image, _pick(rng, CAPTION_PROMPTS), sample.caption))
            questions.append(caption_record(sid, image, vqa_prompt(sample.question), sample.answer))
            answers[sample.answer] = answers.get(sample.answer, 0) + 1
        kinds[kind] = {"pictures": n, "answers": dict(sorted(answers.items())), "chance_accuracy": chance_accuracy(kind)}
    (out_dir / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")
    (out_dir / "vqa.json").write_text(json.dumps(questions, indent=1) + "\n")
    composition = {"split": split, "seed": seed, "image_size": image_size, "pictures": len(captions), "kinds": kinds,
                   "captions": len(captions), "questions": len(questions)}  # fmt: skip
    write_json_atomic(out_dir / "corpus.json", composition)
    return composition
