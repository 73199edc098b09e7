"""The five sources of the synthetic VLM pool, each a distinct kind of data the paper's pool has.

Every generator takes a seeded ``numpy`` generator and returns a :class:`PoolSample`: an RGB
image and question/answer turns. All randomness comes from that generator, so a sample is a
pure function of (seed, source, index).

- ``spatial_pointing`` - embodied-oriented (cf. RefSpatial, RoboPoint): questions about rendered
  Meta-World tabletop scenes; answers from ground-truth object positions projected into the image.
- ``captions`` - general captioning: procedurally drawn landscapes, seascapes and skylines.
- ``book_covers`` - text-centric (cf. OCR-VQA, the paper's lowest-scoring example): rendered
  book covers and documents with "What is the title of this book?" style questions.
- ``chart_qa`` - matplotlib bar, line and pie charts with questions about their values.
- ``counting`` - general pointing and counting of shapes on plain backgrounds.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.calibration import POINT_FORMAT, SHORT_POINT_FORMAT, format_points
from ..runs import StageError

SOURCES: tuple[str, ...] = ("spatial_pointing", "captions", "book_covers", "chart_qa", "counting")
SOURCE_DESCRIPTIONS = {
    "spatial_pointing": "embodied-oriented spatial QA and pointing on rendered Meta-World tabletop scenes",
    "captions": "general captioning of procedurally drawn landscapes, seascapes and skylines",
    "book_covers": "text-centric QA on rendered book covers and documents",
    "chart_qa": "question answering on matplotlib bar, line and pie charts",
    "counting": "general pointing and counting of shapes on plain backgrounds",
}


@dataclass
class PoolSample:
    """One pool sample: ``image`` RGB; ``turns`` [(question, answer), ...]; the first question
    gets the ``<image>`` placeholder when written as LLaVA JSON."""

    image: Image.Image
    turns: list[tuple[str, str]]


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _region_words(x: float, y: float, width: int, height: int) -> str:
    horizontal = ("left", "center", "right")[min(2, int(3 * x / width))]
    vertical = ("upper", "middle", "lower")[min(2, int(3 * y / height))]
    if horizontal == "center" and vertical == "middle":
        return "the center"
    if horizontal == "center":
        return f"the {vertical} center"
    return f"the {vertical} {horizontal}" if vertical != "middle" else f"the middle {horizontal}"


# --------------------------------------------------------------------------- spatial pointing


def spatial_pointing_sample(rng: np.random.Generator, renderer: Any) -> PoolSample:
    """A question about a rendered tabletop scene (``renderer``: a ``TabletopSceneRenderer``).

    Pointing answers are the projected object centres, used only when the segmentation
    render shows the object under that pixel; relations use image x (left/right) or 3D
    distances (closest to the gripper, how far apart), with margins so answers are unambiguous.
    """
    for _ in range(50):
        scene = renderer.render(rng)
        visible = scene.visible_objects()
        if visible:
            break
    else:
        raise StageError(
            f"camera {renderer.view.camera!r} showed no table object in 50 random scenes; "
            "use a camera that sees the table (corner, corner2, corner3, topview)"
        )
    w, h = scene.width, scene.height
    kinds = ["point", "locate", "closest_to_gripper", "left_of", "extreme", "distance", "count", "point_shape"]
    for _ in range(20):
        kind = _pick(rng, kinds)
        turn = _spatial_turn(kind, rng, scene, visible, w, h)
        if turn is not None:
            return PoolSample(Image.fromarray(scene.image), [turn])
    obj = visible[0]
    turn = (f"Point to the {obj.name}. {SHORT_POINT_FORMAT}", format_points([obj.pixel], w, h))
    return PoolSample(Image.fromarray(scene.image), [turn])


def _spatial_turn(kind: str, rng, scene, visible, w: int, h: int) -> tuple[str, str] | None:
    objects = scene.objects
    if kind == "point":
        obj = _pick(rng, visible)
        verb = _pick(rng, ["Point to the", "Pinpoint the", "Where is the", "Locate the"])
        q = f"{verb} {obj.name} on the table{'?' if verb == 'Where is the' else '.'} {SHORT_POINT_FORMAT}"
        return q, format_points([obj.pixel], w, h)
    if kind == "locate":
        obj = _pick(rng, visible)
        region = _region_words(*obj.pixel, w, h)
        q = f"Locate a point on the {obj.name} at {region} of the image. {SHORT_POINT_FORMAT}"
        return q, format_points([obj.pixel], w, h)
    if kind == "closest_to_gripper":
        dist = np.array([np.linalg.norm(o.position - scene.gripper_position) for o in objects])
        order = np.argsort(dist)
        if len(objects) > 1 and dist[order[1]] - dist[order[0]] < 0.03 or not objects[order[0]].pointable:
            return None
        q = _pick(rng, ["Which object is closest to the robot gripper?", "Which object is nearest to the gripper?"])
        return q, f"The {objects[order[0]].name}."
    if kind == "left_of":
        if len(visible) < 2:
            return None
        i, j = rng.choice(len(visible), size=2, replace=False)
        a, b = visible[i], visible[j]
        if abs(a.pixel[0] - b.pixel[0]) < 4:
            return None
        side = _pick(rng, ["left", "right"])
        truth = a.pixel[0] < b.pixel[0] if side == "left" else a.pixel[0] > b.pixel[0]
        q = f"From the camera's viewpoint, is the {a.name} to the {side} of the {b.name}?"
        return q, "Yes." if truth else "No."
    if kind == "extreme":
        if len(visible) < 2:
            return None
        side = _pick(rng, ["left", "right"])
        xs = np.array([o.pixel[0] for o in visible])
        order = np.argsort(xs if side == "left" else -xs)
        if abs(xs[order[0]] - xs[order[1]]) < 4:
            return None
        return f"Which object on the table is farthest to the {side} in the image?", f"The {visible[order[0]].name}."
    if kind == "distance":
        if len(visible) < 2:
            return None
        i, j = rng.choice(len(visible), size=2, replace=False)
        d = np.linalg.norm(visible[i].position[:2] - visible[j].position[:2])
        return (
            f"How far apart are the {visible[i].name} and the {visible[j].name}?",
            f"About {int(round(100 * d))} centimeters.",
        )
    if kind == "count":
        if len(visible) != len(objects):
            return None
        return "How many objects are there on the table in front of the robot?", str(len(objects))
    if kind == "point_shape":
        shape = _pick(rng, [o.shape for o in objects])
        same = [o for o in objects if o.shape == shape]
        if not all(o.pointable for o in same):
            return None
        plural = {"cube": "cubes", "ball": "balls", "cylinder": "cylinders"}[shape]
        return f"Point to all the {plural} on the table. {SHORT_POINT_FORMAT}", format_points([o.pixel for o in same], w, h)
    raise ValueError(kind)


# --------------------------------------------------------------------------- captions

_SKIES = {
    "day": ((110, 170, 235), (190, 225, 250), "a clear blue sky"),
    "overcast": ((150, 155, 165), (200, 202, 208), "a grey overcast sky"),
    "sunset": ((70, 40, 110), (250, 150, 70), "an orange sunset sky"),
    "night": ((5, 8, 30), (25, 35, 80), "a dark night sky"),
}
_LANDSCAPES = ("mountains", "sea", "hills", "desert", "city", "forest")


def _vertical_gradient(width: int, height: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    row = (1 - t) * np.array(top, dtype=np.float64) + t * np.array(bottom, dtype=np.float64)
    return np.broadcast_to(row, (height, width, 3)).copy()


def _shade(colour, factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * factor))) for c in colour)


def caption_sample(rng: np.random.Generator, size: int) -> PoolSample:
    """A procedurally drawn outdoor scene (sky, sun or moon, clouds, one landscape type, extras)
    and a one-sentence caption listing what was drawn."""
    s = 2 * size  # draw at 2x and downsample for smooth edges
    sky = _pick(rng, list(_SKIES))
    land = _pick(rng, list(_LANDSCAPES))
    top, bottom, sky_words = _SKIES[sky]
    horizon = int(s * rng.uniform(0.45, 0.65))
    pixels = _vertical_gradient(s, s, top, bottom)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    extras: list[str] = []

    if sky == "night":
        for _ in range(int(rng.integers(20, 60))):
            x, y = rng.integers(0, s), rng.integers(0, horizon)
            draw.point((int(x), int(y)), fill=(255, 255, 230))
        cx, cy, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.08, 0.3) * s, s * rng.uniform(0.04, 0.07)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(240, 240, 210))
        extras.append("a full moon")
    elif sky in ("day", "sunset"):
        cx, cy, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.1, 0.35) * s, s * rng.uniform(0.05, 0.09)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 230, 120) if sky == "day" else (255, 120, 60))
        extras.append("the sun" if sky == "day" else "the setting sun")
    if sky in ("day", "overcast") and rng.random() < 0.7:
        n = int(rng.integers(1, 4))
        for _ in range(n):
            cx, cy = rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.3) * s
            for _ in range(5):
                dx, dy, r = rng.normal(0, 0.04 * s), rng.normal(0, 0.015 * s), rng.uniform(0.03, 0.06) * s
                draw.ellipse((cx + dx - r, cy + dy - r * 0.7, cx + dx + r, cy + dy + r * 0.7), fill=(250, 250, 252))
        extras.append("a few white clouds" if n > 1 else "a white cloud")

    dark = 0.45 if sky == "night" else 1.0
    if land == "mountains":
        n = int(rng.integers(2, 5))
        for k in range(n):
            peak_x, peak_y = rng.uniform(0, 1) * s, horizon - rng.uniform(0.15, 0.35) * s
            half = rng.uniform(0.2, 0.4) * s
            base = _shade((110, 100, 95), dark * rng.uniform(0.8, 1.1))
            draw.polygon([(peak_x - half, horizon), (peak_x, peak_y), (peak_x + half, horizon)], fill=base)
            cap = 0.25
            draw.polygon(
                [(peak_x - half * cap, peak_y + (horizon - peak_y) * cap), (peak_x, peak_y),
                 (peak_x + half * cap, peak_y + (horizon - peak_y) * cap)],
                fill=_shade((245, 245, 250), dark),
            )  # fmt: skip
        draw.rectangle((0, horizon, s, s), fill=_shade((90, 140, 70), dark))
        subject = f"{n} snow-capped mountains above a green valley"
    elif land == "sea":
        draw.rectangle((0, horizon, s, s), fill=_shade((30, 90, 160), dark))
        for _ in range(int(rng.integers(8, 20))):
            x, y = rng.uniform(0, s), rng.uniform(horizon + 4, s)
            draw.arc((x - 12, y - 4, x + 12, y + 4), 200, 340, fill=_shade((200, 225, 245), dark), width=2)
        subject = "a calm blue sea stretching to the horizon"
        if rng.random() < 0.5:
            bx, by = rng.uniform(0.2, 0.8) * s, horizon + rng.uniform(0.05, 0.15) * s
            draw.polygon([(bx - 20, by), (bx + 20, by), (bx + 14, by + 8), (bx - 14, by + 8)], fill=(120, 70, 40))
            draw.polygon([(bx, by - 30), (bx, by - 2), (bx + 18, by - 2)], fill=(250, 250, 250))
            extras.append("a small sailboat")
    elif land == "hills":
        for k in range(3):
            cy = horizon + k * 0.1 * s
            cx = rng.uniform(0, 1) * s
            green = _shade((80 + 25 * k, 160, 70), dark)
            draw.ellipse((cx - 0.8 * s, cy - 0.12 * s, cx + 0.8 * s, cy + 0.5 * s), fill=green)
        draw.rectangle((0, horizon + 0.25 * s, s, s), fill=_shade((100, 170, 80), dark))
        subject = "rolling green hills"
    elif land == "desert":
        draw.rectangle((0, horizon, s, s), fill=_shade((225, 190, 120), dark))
        for _ in range(3):
            cx, cy = rng.uniform(0, 1) * s, horizon + rng.uniform(0.05, 0.3) * s
            draw.ellipse((cx - 0.4 * s, cy - 0.06 * s, cx + 0.4 * s, cy + 0.2 * s), fill=_shade((210, 170, 100), dark))
        subject = "sand dunes in a desert"
        if rng.random() < 0.5:
            x = rng.uniform(0.2, 0.8) * s
            draw.rectangle((x - 4, horizon - 40, x + 4, horizon + 10), fill=(50, 120, 50))
            draw.rectangle((x - 16, horizon - 25, x - 4, horizon - 20), fill=(50, 120, 50))
            extras.append("a cactus")
    elif land == "city":
        draw.rectangle((0, horizon, s, s), fill=_shade((70, 70, 75), dark))
        x = 0.0
        while x < s:
            bw, bh = rng.uniform(0.06, 0.14) * s, rng.uniform(0.15, 0.45) * s
            body = _shade((90, 95, 110), dark * rng.uniform(0.8, 1.2))
            draw.rectangle((x, horizon - bh, x + bw, horizon), fill=body)
            lit = (255, 220, 120) if sky == "night" else _shade((170, 200, 230), 0.9)
            for wy in np.arange(horizon - bh + 6, horizon - 6, 10):
                for wx in np.arange(x + 4, x + bw - 6, 9):
                    if rng.random() < 0.6:
                        draw.rectangle((wx, wy, wx + 4, wy + 5), fill=lit)
            x += bw + rng.uniform(1, 6)
        subject = "a city skyline with tall buildings" + (" and lit windows" if sky == "night" else "")
    else:  # forest
        draw.rectangle((0, horizon, s, s), fill=_shade((70, 130, 60), dark))
        n = int(rng.integers(5, 12))
        for _ in range(n):
            x, y = rng.uniform(0, 1) * s, horizon + rng.uniform(-0.02, 0.25) * s
            hgt = rng.uniform(0.12, 0.25) * s
            draw.rectangle((x - 3, y - 4, x + 3, y + 8), fill=(90, 60, 30))
            draw.polygon([(x - hgt * 0.3, y), (x, y - hgt), (x + hgt * 0.3, y)], fill=_shade((30, 100, 40), dark))
        subject = "a pine forest on a grassy plain"

    if sky != "night" and rng.random() < 0.35:
        for _ in range(int(rng.integers(2, 5))):
            bx, by = rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.35) * s
            draw.line([(bx - 6, by - 3), (bx, by), (bx + 6, by - 3)], fill=(30, 30, 30), width=2)
        extras.append("birds flying")

    array = np.asarray(image, dtype=np.float64) + rng.normal(0, 4.0, size=(s, s, 3))  # film grain
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).resize((size, size), Image.LANCZOS)
    time_words = {"day": "daytime", "overcast": "cloudy", "sunset": "sunset", "night": "nighttime"}[sky]
    caption = f"A {time_words} view of {subject} under {sky_words}"
    caption += (", with " + " and ".join(extras) + ".") if extras else "."
    question = _pick(rng, [
        "Describe this image in one sentence.", "Write a short caption for this picture.",
        "What do you see in this image?", "Provide a brief description of the scene.",
    ])  # fmt: skip
    return PoolSample(image, [(question, caption)])


# --------------------------------------------------------------------------- book covers and documents

_TITLE_WORDS = {
    "adjective": ["Silent", "Hidden", "Last", "Broken", "Golden", "Distant", "Forgotten", "Endless", "Crimson",
                  "Quiet"],
    "noun": ["River", "Garden", "Empire", "Winter", "Harbor", "Kingdom", "Letters", "Mirror", "Orchard", "Voyage"],
    "field": ["Trigonometry", "Algebra", "Microeconomics", "Organic Chemistry", "Statistics", "Calculus",
              "World History", "Accounting", "Biology", "Linear Algebra", "Physics", "Psychology"],
    "topic": ["Italian Cooking", "Baking Bread", "Vegetarian Meals", "Sourdough", "Thai Cuisine"],
    "place": ["Portugal", "Japan", "Iceland", "Peru", "Morocco", "Norway", "Vietnam", "Scotland"],
}  # fmt: skip
_FIRST = ["Charles", "Maria", "James", "Linda", "Robert", "Susan", "David", "Karen", "Thomas", "Nancy", "Emily",
          "Daniel"]  # fmt: skip
_LAST = ["McKeague", "Johnson", "Garcia", "Miller", "Anderson", "Thompson", "Martinez", "Clark", "Lewis", "Walker",
         "Young", "Hall"]  # fmt: skip
_GENRES = {
    "textbook": ("Mathematics & Science", lambda rng, w: _pick(rng, w["field"]) if rng.random() < 0.5
                 else f"Introduction to {_pick(rng, w['field'])}"),
    "novel": ("Literature & Fiction", lambda rng, w: f"The {_pick(rng, w['adjective'])} {_pick(rng, w['noun'])}"),
    "cookbook": ("Cookbooks, Food & Wine", lambda rng, w: f"The Joy of {_pick(rng, w['topic'])}"),
    "travel guide": ("Travel", lambda rng, w: f"A Traveler's Guide to {_pick(rng, w['place'])}"),
    "poetry": ("Poetry", lambda rng, w: f"{_pick(rng, w['noun'])}s of the {_pick(rng, w['adjective'])} Sea"),
}  # fmt: skip
_GENRE_NOUNS = {"textbook": "a textbook", "novel": "a novel", "cookbook": "a cookbook",
                "travel guide": "a travel guide", "poetry": "a book of poetry"}  # fmt: skip


@lru_cache(maxsize=None)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A DejaVu font from matplotlib's bundled fonts (present wherever matplotlib is)."""
    import matplotlib

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(trial, font=font) <= max_width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def _centered_text(draw, lines, font, y: float, width: int, fill) -> float:
    for line in lines:
        box = draw.textbbox((0, 0), line, font=font)
        draw.text(((width - (box[2] - box[0])) / 2 - box[0], y - box[1]), line, font=font, fill=fill)
        y += (box[3] - box[1]) * 1.25
    return y


def book_cover_sample(rng: np.random.Generator, size: int) -> PoolSample:
    """A rendered book cover (title, author, genre styling) with OCR-style questions, or, one
    time in three, a typed document page with questions about its heading and date.

    Covers are portrait, flat and saturated with large type - as unlike a robot camera frame
    as a real OCR-VQA cover is."""
    if rng.random() < 1 / 3:
        return _document_sample(rng, size)
    width, height = int(round(size * 0.75)) * 2, size * 2
    genre = _pick(rng, list(_GENRES))
    category, make_title = _GENRES[genre]
    title = make_title(rng, _TITLE_WORDS)
    author = f"{_pick(rng, _FIRST)} {_pick(rng, _LAST)}"
    hue, value = rng.uniform(0, 1), rng.choice([0.15, 0.85, 0.95])
    background = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), value))
    light = value > 0.5 and sum(background) > 380
    ink = (15, 15, 20) if light else (250, 250, 245)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    accent = tuple(int(c) for c in rng.integers(0, 255, size=3))
    band_y = int(height * rng.uniform(0.55, 0.7))
    draw.rectangle((0, band_y, width, band_y + height * 0.06), fill=accent)
    if rng.random() < 0.5:
        m = width * 0.05
        draw.rectangle((m, m, width - m, height - m), outline=ink, width=2)
    title_font = _font(_pick(rng, ["DejaVuSerif-Bold.ttf", "DejaVuSans-Bold.ttf"]), int(height * 0.1))
    lines = _wrap(draw, title, title_font, width * 0.85)
    while len(lines) > 3 or max(draw.textlength(line, font=title_font) for line in lines) > width * 0.9:
        title_font = _font(title_font.path.rsplit("/", 1)[-1], int(title_font.size * 0.85))
        lines = _wrap(draw, title, title_font, width * 0.85)
    _centered_text(draw, lines, title_font, height * 0.14, width, ink)
    author_font = _font("DejaVuSans.ttf", int(height * 0.055))
    _centered_text(draw, [author], author_font, height * 0.8, width, ink)
    edition = None
    if rng.random() < 0.4:
        edition = _pick(rng, ["Second Edition", "Third Edition", "Revised Edition"])
        edition_font = _font("DejaVuSans-Oblique.ttf", int(height * 0.045))
        _centered_text(draw, [edition], edition_font, band_y - height * 0.08, width, ink)
    image = image.resize((width // 2, height // 2), Image.LANCZOS)

    turns = [
        ("Who wrote this book?", f"{author}."),
        ("What is the title of this book?", f"{title}."),
        ("What is the genre of this book?", f"{category}."),
    ]
    other = _pick(rng, [g for g in _GENRES if g != genre])
    turns.append((f"Is this {_GENRE_NOUNS[genre]}?", "Yes"))
    turns.append((f"Is this {_GENRE_NOUNS[other]}?", "No"))
    if edition:
        turns.append(("Which edition of the book is this?", f"{edition}."))
    return PoolSample(image, [turns[i] for i in rng.permutation(len(turns))])  # OCR-VQA asks ~5 per cover


_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]  # fmt: skip
_DOC_SUBJECTS = ["Quarterly Budget Review", "Office Relocation Plan", "Annual Safety Training", "Library Opening Hours",
                 "Parking Policy Update", "Committee Meeting Minutes", "Holiday Schedule",
                 "Invoice Payment Terms"]  # fmt: skip
_SENTENCES = [
    "Please review the attached figures before the next meeting.",
    "All staff are asked to confirm attendance by Friday.",
    "The new schedule takes effect at the start of next month.",
    "Questions should be sent to the administration office.",
    "Payments received after the due date will incur a late fee.", "The committee approved the proposal unanimously.",
    "Copies of this notice are available at the front desk.", "Thank you for your continued cooperation.",
]  # fmt: skip


def _document_sample(rng: np.random.Generator, size: int) -> PoolSample:
    width, height = int(round(size * 0.75)) * 2, size * 2
    image = Image.new("RGB", (width, height), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    subject = _pick(rng, _DOC_SUBJECTS)
    date = f"{_pick(rng, _MONTHS)} {int(rng.integers(1, 29))}, {int(rng.integers(1990, 2025))}"
    sender = f"{_pick(rng, _FIRST)} {_pick(rng, _LAST)}"
    margin = width * 0.08
    y = height * 0.06
    heading = _font("DejaVuSans-Bold.ttf", int(height * 0.055))
    for line in _wrap(draw, subject.upper(), heading, width - 2 * margin):
        draw.text((margin, y), line, font=heading, fill=(10, 10, 10))
        y += heading.size * 1.3
    small = _font("DejaVuSans.ttf", int(height * 0.032))
    for label in (f"Date: {date}", f"From: {sender}"):
        draw.text((margin, y), label, font=small, fill=(30, 30, 30))
        y += small.size * 1.4
    draw.line((margin, y, width - margin, y), fill=(0, 0, 0), width=2)
    y += small.size
    body = _font("DejaVuSerif.ttf", int(height * 0.03))
    text = " ".join(_SENTENCES[i] for i in rng.permutation(len(_SENTENCES))[: int(rng.integers(4, 8))])
    for line in _wrap(draw, text, body, width - 2 * margin):
        if y > height - margin:
            break
        draw.text((margin, y), line, font=body, fill=(40, 40, 40))
        y += body.size * 1.35
    image = image.resize((width // 2, height // 2), Image.LANCZOS)
    turns = [
        ("What is the title of this document?", f"{subject}."),
        ("What date is written on this document?", f"{date}."),
        ("Who is the sender of this document?", f"{sender}."),
    ]
    return PoolSample(image, [turns[i] for i in rng.permutation(len(turns))])


# --------------------------------------------------------------------------- charts

_CHART_TOPICS = [
    ("Fruit sales", "units", ["Apples", "Pears", "Plums", "Grapes", "Cherries", "Lemons"]),
    ("Rainfall", "mm", ["Oslo", "Lima", "Cairo", "Perth", "Quito", "Dublin"]),
    ("Votes", "votes", ["Red", "Blue", "Green", "Orange", "Purple"]),
    ("Website visits", "thousand", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]),
    ("Energy use", "GWh", ["Coal", "Gas", "Wind", "Solar", "Hydro", "Nuclear"]),
]


def chart_qa_sample(rng: np.random.Generator, size: int) -> PoolSample:
    """A bar, line or pie chart drawn with matplotlib (Agg, no pyplot state) and a question
    about the plotted values (read off the value labels, compared, or summed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kind = _pick(rng, ["bar", "barh", "line", "pie"])
    topic, unit, names = _pick(rng, _CHART_TOPICS)
    if kind == "line":
        start = int(rng.integers(1995, 2015))
        labels = [str(start + k) for k in range(int(rng.integers(5, 8)))]
    else:
        k = int(rng.integers(3, min(6, len(names)) + 1))
        labels = [names[i] for i in sorted(rng.choice(len(names), size=k, replace=False))]
    values = rng.integers(5, 100, size=len(labels))
    while len(set(values.tolist())) < len(values):  # distinct values keep max/min answers unique
        values = rng.integers(5, 100, size=len(labels))

    dpi = 100
    panel = _pick(rng, ["#eaeaf2", "#e5e5e5", "#dddddd", "#ffffff"])  # seaborn, ggplot, grey and plain styles
    fig = Figure(figsize=(size / dpi, size / dpi), dpi=dpi, facecolor=_pick(rng, ["#ffffff", "#f0f0f0", "#d9d9d9"]))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.3, 0.12, 0.62, 0.76) if kind == "barh" else (0.16, 0.16, 0.8, 0.72), facecolor=panel)
    if panel != "#ffffff" and kind != "pie":
        ax.grid(True, color="white", linewidth=0.8)
        ax.set_axisbelow(True)
    colour = tuple(float(c) for c in rng.uniform(0.1, 0.8, size=3))
    font = max(4, size // 28)
    if kind == "bar":
        bars = ax.bar(labels, values, color=colour)
        ax.bar_label(bars, fontsize=font)
    elif kind == "barh":
        bars = ax.barh(labels, values, color=colour)
        ax.bar_label(bars, fontsize=font)
    elif kind == "line":
        ax.plot(labels, values, marker="o", color=colour, linewidth=1)
        ax.tick_params(axis="x", labelrotation=45)
        for x, v in zip(labels, values):
            ax.annotate(str(v), (x, v), fontsize=font, ha="center", va="bottom")
    else:
        ax.set_position((0.05, 0.05, 0.9, 0.8))
        ax.pie(values, labels=labels, autopct="%d%%", textprops={"fontsize": font})
    ax.set_title(f"{topic} ({unit})", fontsize=font + 1)
    ax.tick_params(labelsize=font)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())

    i, j = rng.choice(len(labels), size=2, replace=False)
    top = labels[int(np.argmax(values))]
    low = labels[int(np.argmin(values))]
    if kind == "pie":
        shares = [int(100.0 * (v / values.sum())) for v in values]  # what autopct="%d%%" prints
        options = [
            (f"What percentage of the total is {labels[i]}?", f"{shares[i]}%"),
            ("Which category has the largest share?", top),
            ("Which category has the smallest share?", low),
        ]
    else:
        axis = "year" if kind == "line" else "category"
        options = [
            (f"What is the value for {labels[i]}?", str(values[i])),
            (f"Which {axis} has the highest {topic.lower()}?", top),
            (f"Which {axis} has the lowest {topic.lower()}?", low),
            (f"What is the difference between {labels[i]} and {labels[j]}?", str(abs(int(values[i]) - int(values[j])))),
            ("What is the sum of all the values in the chart?", str(int(values.sum()))),
        ]
    return PoolSample(image, [_pick(rng, options)])


# --------------------------------------------------------------------------- counting

_SHAPE_COLOURS = {
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 160, 60), "yellow": (240, 200, 20),
    "purple": (140, 60, 180), "black": (25, 25, 25),
}  # fmt: skip
_COUNT_SHAPES = ("circle", "square", "triangle", "star")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.7), (cx - r * 0.95, cy + r * 0.7)], fill=fill)
    else:
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + rr * np.cos(a), cy - rr * np.sin(a)) for a, rr in zip(angles, radii)], fill=fill)


def counting_sample(rng: np.random.Generator, size: int) -> PoolSample:
    """Non-overlapping coloured shapes on a plain background; counting questions, or pointing
    to one shape or to all shapes of a kind (answers are the drawn centres)."""
    s = 2 * size
    background = tuple(int(c) for c in rng.integers(120, 240, size=3))
    image = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(image)
    n = int(rng.integers(2, 10))
    radius = s * rng.uniform(0.05, 0.08)
    shapes: list[tuple[str, str, float, float]] = []
    tries = 0
    while len(shapes) < n and tries < 500:
        tries += 1
        cx, cy = rng.uniform(radius * 1.2, s - radius * 1.2, size=2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (2.8 * radius) ** 2 for _, _, x, y in shapes):  # shapes reach 1.2 r
            shapes.append((_pick(rng, list(_SHAPE_COLOURS)), _pick(rng, _COUNT_SHAPES), float(cx), float(cy)))
    for colour, shape, cx, cy in shapes:
        _draw_shape(draw, shape, cx, cy, radius, _SHAPE_COLOURS[colour])
    image = image.resize((size, size), Image.LANCZOS)

    centres = [(cx / 2, cy / 2) for _, _, cx, cy in shapes]
    kind = _pick(rng, ["count_all", "count_shape", "count_colour_shape", "point_one", "point_all"])
    colour, shape, _, _ = shapes[int(rng.integers(len(shapes)))]
    if kind == "count_all":
        turn = ("How many shapes are there in the image?", str(len(shapes)))
    elif kind == "count_shape":
        turn = (f"How many {_PLURALS[shape]} are there?", str(sum(s_ == shape for _, s_, _, _ in shapes)))
    elif kind == "count_colour_shape":
        count = sum(c == colour and s_ == shape for c, s_, _, _ in shapes)
        turn = (f"How many {colour} {_PLURALS[shape]} are in the picture?", str(count))
    else:
        same = [p for (c, s_, _, _), p in zip(shapes, centres) if s_ == shape and (kind == "point_all" or c == colour)]
        if kind == "point_one" and len(same) == 1:
            turn = (f"Point to the {colour} {shape}. {POINT_FORMAT}", format_points(same, size, size))
        else:
            same = [p for (_, s_, _, _), p in zip(shapes, centres) if s_ == shape]
            turn = (f"Point to all the {_PLURALS[shape]}. {POINT_FORMAT}", format_points(same, size, size))
    return PoolSample(image, [turn])


GENERATORS: dict[str, Callable[..., PoolSample]] = {
    "spatial_pointing": spatial_pointing_sample,
    "captions": caption_sample,
    "book_covers": book_cover_sample,
    "chart_qa": chart_qa_sample,
    "counting": counting_sample,
}
