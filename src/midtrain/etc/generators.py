"""ETC question generators: questions about a recorded frame whose answers are the episode's ground truth.

Each generator is tagged with its ETC category (etc-two-bridges: ``scene_grounding`` - task-agnostic
perception; ``task_oriented`` - affordance and planning; ``action_aligned`` - motion-coupled) and
the Rethinking capability domain it serves; it declares the quantities it needs
(:mod:`midtrain.etc.episodes`) and yields :class:`QA` items for the kept frames ``keep`` (row
positions) of one episode.

Geometry. Directions are the world-frame offset ``o - e`` of an object from the end effector, named
per axis (``axes``: what +x, +y, +z mean to the robot) where ``|o_i - e_i| >= direction_threshold_m``;
distances are Euclidean, bucketed by ``distance_buckets_m``. Image points are projections
``u = fx X_c/Z_c + cx, v = fy Y_c/Z_c + cy`` of ``X_c = R X + t`` with the frame's calibration
(:func:`midtrain.data.calibration.project_points`), written normalised to [0, 1] as
``(u/W, v/H)`` with three decimals (RoboPoint's format, as ``sim pool``'s spatial source). A
keypoint outside ``[0, W) x [0, H)`` or behind the camera is never clipped: the question is
dropped and counted (``keypoints_outside_image``).

Task stages come from the gripper command, its opening and gripper-object contact: per step,
``close`` (commanded closed, opening still falling), ``open`` (commanded open, opening rising),
``contact`` (touching an object), ``approach`` (no contact yet) or ``after`` (contact has ended);
runs shorter than ``min_stage_steps`` merge into the previous run. The next sub-action is the
next run's stage.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

import numpy as np

from ..data.calibration import SHORT_POINT_FORMAT, format_points, inside_image, project_points
from ..seeding import keyed_rng

from .fields import EpisodeFields


class GeneratorSettings(Protocol):
    """What generators read of the stage's config (``EtcConfig`` has these fields; its help says what
    each means). A protocol, so the generators do not import the config that validates against them."""

    axes: list[str]
    direction_threshold_m: float
    distance_buckets_m: list[float]
    margin_m: float
    trajectory_points: int
    trajectory_stride: int
    gripper_horizon: int
    action_horizon: int
    action_decimals: int
    min_stage_steps: int
    frame_order_gap: int


AXIS_WORDS = {"right": "left", "left": "right", "forward": "backward", "backward": "forward", "up": "down", "down": "up"}


@dataclass
class QA:
    """One question about the frames at row positions ``frames`` (one image, or two for ordering)."""

    frames: tuple[int, ...]
    question: str
    answer: str
    key: str = ""  # distinguishes several questions of one generator about the same frame


@dataclass
class Context:
    """What a generator may use besides the episode: config, image size, seeded RNG, counters."""

    config: GeneratorSettings
    width: int
    height: int
    rng: np.random.Generator
    counts: Counter

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def points_inside(self, pixels: np.ndarray) -> bool:
        """Whether every keypoint is in the image; those outside are counted (the caller drops the question)."""
        inside = inside_image(pixels, self.width, self.height)
        if not inside.all():
            self.counts["keypoints_outside_image"] += int((~inside).sum())
            self.counts["questions_dropped_outside_image"] += 1
            return False
        return True

    def points(self, pixels: np.ndarray) -> str:
        return format_points(np.atleast_2d(pixels), self.width, self.height)


GeneratorFn = Callable[[EpisodeFields, np.ndarray, Context], Iterator[QA]]


@dataclass(frozen=True)
class Generator:
    """``needs``: quantities it uses (``a|b``: either will do; the episode's task decides which)."""

    name: str
    category: str
    domain: str
    needs: tuple[str, ...]
    fn: GeneratorFn
    help: str

    def missing(self, has: Callable[[str], bool]) -> list[str]:
        """The needed quantities that ``has`` says are absent."""
        return [need for need in self.needs if not any(has(q) for q in need.split("|"))]

    def rng(self, seed: int, episode: int) -> np.random.Generator:
        """Phrasing choices depend only on (seed, generator, episode)."""
        return keyed_rng(seed, self.name, episode)


# --------------------------------------------------------------------------- helpers


def _things(ep: EpisodeFields, with_goal: bool = True) -> list[tuple[str, np.ndarray]]:
    """(name, positions [T, 3]) of the episode's named objects (and goal)."""
    out = []
    if "objects" in ep.fields:
        objects = ep.fields["objects"]
        for k, name in enumerate(ep.names.objects[: objects.shape[1]]):
            out.append((name, objects[:, k]))
    if with_goal and ep.names.goal and "goal" in ep.fields:
        out.append((ep.names.goal, ep.fields["goal"]))
    return out


def _project(ep: EpisodeFields, points: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pixels ``[..., 2]`` of world ``points`` ``[len(rows), ..., 3]`` with the calibration of each row."""
    intr, extr = ep.fields["intrinsics"][rows], ep.fields["extrinsics"][rows]
    extra = points.ndim - 2
    intr = intr.reshape(intr.shape[:1] + (1,) * extra + (4,))
    extr = extr.reshape(extr.shape[:1] + (1,) * extra + (3, 4))
    return project_points(points, intr, extr)[0]


def _distance_words(d: float, edges: list[float]) -> str:
    """A distance bucket as words before 'the gripper': 'within 5 cm of', '5-15 cm from', ..."""
    cm = [round(e * 100) for e in edges]
    if d < edges[0]:
        return f"within {cm[0]} cm of"
    for lo, hi, e in zip(cm, cm[1:], edges[1:]):
        if d < e:
            return f"{lo}-{hi} cm from"
    return f"more than {cm[-1]} cm from"


_DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "above", "down": "below"}


def _direction_words(offset: np.ndarray, config: GeneratorSettings) -> list[str]:
    """Words for an offset (object - gripper) per axis: 'forward', 'to the left', 'below' ..."""
    words = []
    for value, positive in zip(offset, config.axes):
        if abs(value) >= config.direction_threshold_m:
            word = positive if value > 0 else AXIS_WORDS[positive]
            words.append(_DIRECTION_PHRASES.get(word, word))
    return words


def _join(words: list[str], last: str = "and") -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" {last} " + words[-1]


# --------------------------------------------------------------------------- scene grounding


def relative_position(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    things = _things(ep)
    if not things:
        return
    for t in keep:
        name, pos = things[int(ctx.rng.integers(len(things)))]
        offset = pos[t] - ep.fields["ee_pos"][t]
        words = _direction_words(offset, ctx.config)
        dist = _distance_words(float(np.linalg.norm(offset)), ctx.config.distance_buckets_m)
        where = _join(words) if words else "level with it on every axis"
        q = ctx.pick([
            f"Where is the {name} relative to the robot's gripper? Give the direction from the robot's point of view and the distance.",
            f"From the robot's point of view, in which direction and how far from the gripper is the {name}?",
        ])  # fmt: skip
        yield QA((int(t),), q, f"The {name} is {dist} the gripper, {where}.")


def nearest_object(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    things = _things(ep)
    if len(things) < 2:
        return
    names = [n for n, _ in things]
    dist = np.stack([np.linalg.norm(p - ep.fields["ee_pos"], axis=1) for _, p in things], axis=1)  # [T, n]
    order = np.argsort(dist, axis=1)
    for t in keep:
        first, second = order[t, 0], order[t, 1]
        if dist[t, second] - dist[t, first] < ctx.config.margin_m:
            ctx.counts["questions_ambiguous"] += 1
            continue
        listed = _join([f"the {n}" for n in names], "or")
        q = ctx.pick([f"Which is closest to the robot's gripper: {listed}?", f"Which is nearer to the gripper: {listed}?"])
        yield QA((int(t),), q, f"The {names[first]}.")


def point_object(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    things = _things(ep)
    if not things:
        return
    for t in keep:
        name, pos = things[int(ctx.rng.integers(len(things)))]
        pixel = _project(ep, pos[t][None, None], np.array([t]))[0]
        if not ctx.points_inside(pixel):
            continue
        verb = ctx.pick(["Point to the", "Locate the", "Where is the"])
        q = f"{verb} {name}{'?' if verb == 'Where is the' else '.'} {SHORT_POINT_FORMAT}"
        yield QA((int(t),), q, ctx.points(pixel))


def gripper_point(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    pixels = _project(ep, ep.fields["ee_pos"][keep][:, None], keep)
    for t, pixel in zip(keep, pixels):
        if not ctx.points_inside(pixel):
            continue
        q = ctx.pick(["Point to the robot's gripper, between its fingertips.", "Where is the tip of the robot's gripper?"])
        yield QA((int(t),), f"{q} {SHORT_POINT_FORMAT}", ctx.points(pixel))


def _opening_trend(opening: np.ndarray, eps: float = 0.02) -> np.ndarray:
    """-1 closing, +1 opening, 0 still: the change of the opening over the next step."""
    delta = np.diff(opening, append=opening[-1:])
    return np.where(delta < -eps, -1, np.where(delta > eps, 1, 0))


OPEN_LEVEL = 0.9  # an opening at or above this (1 = fully open) reads as "open" when the fingers are still


def gripper_state(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    opening = ep.fields["gripper_opening"]
    trend = _opening_trend(opening)
    contact = ep.fields.get("contact")
    holder = ep.names.objects[0] if ep.names.objects and ep.names.verb == "grasp" else None
    for t in keep:
        if trend[t] < 0:
            state = "closing"
        elif trend[t] > 0:
            state = "opening"
        elif opening[t] >= OPEN_LEVEL:
            state = "open"
        else:
            state = f"closed and holding the {holder}" if holder and contact is not None and contact[t] else "closed"
        q = ctx.pick(["Is the robot's gripper open or closed?", "What is the state of the robot's gripper?"])
        yield QA((int(t),), q, f"The gripper is {state}.")


def camera_geometry(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    extr = ep.fields["extrinsics"]
    cam = np.einsum("tij,tj->ti", extr[:, :, :3], ep.fields["ee_pos"]) + extr[:, :, 3]
    distance = np.linalg.norm(cam, axis=1)
    for t in keep:
        if cam[t, 2] <= 0:
            ctx.counts["keypoints_outside_image"] += 1
            ctx.counts["questions_dropped_outside_image"] += 1
            continue
        q = ctx.pick(["How far is the robot's gripper from the camera, in metres?",
                      "Estimate the distance between the camera and the gripper in metres."])  # fmt: skip
        yield QA((int(t),), q, f"About {distance[t]:.2f} m.", "distance")
    first = int(keep[0])
    rotation, translation = extr[first, :, :3], extr[first, :, 3]
    centre = -rotation.T @ translation
    fovy = 2 * np.degrees(np.arctan(ctx.height / 2 / ep.fields["intrinsics"][first, 1]))
    yield QA((first,), "Where is the camera in the robot's world frame? Give (x, y, z) in metres.",
             f"({centre[0]:.2f}, {centre[1]:.2f}, {centre[2]:.2f})", "position")  # fmt: skip
    yield QA((first,), "What is the camera's vertical field of view, in degrees?", f"About {fovy:.0f} degrees.", "fov")


# --------------------------------------------------------------------------- task-oriented


def affordance_point(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    names = ep.names
    if names.target == "goal":
        if "goal" not in ep.fields:
            return
        target = ep.fields["goal"]
    else:
        if "objects" not in ep.fields or not names.objects:
            return
        target = ep.fields["objects"][:, 0]
    pixels = _project(ep, target[keep][:, None], keep)
    name = names.target_name()
    for t, pixel in zip(keep, pixels):
        if not ctx.points_inside(pixel):
            continue
        q = ctx.pick([
            f"The task is to {ep.instruction}. Point to where the gripper should {names.verb} the {name}.",
            f"To {ep.instruction}, where should the robot {names.verb} the {name}?",
        ]) if names.verb != "reach" else f"The task is to {ep.instruction}. Point to where the gripper should go."  # fmt: skip
        yield QA((int(t),), f"{q} {SHORT_POINT_FORMAT}", ctx.points(pixel))


APPROACH, CLOSE, CONTACT, OPEN, AFTER = range(5)


def task_stages(command: np.ndarray, opening: Optional[np.ndarray], contact: Optional[np.ndarray],
                min_steps: int) -> np.ndarray:  # fmt: skip
    """Stage code per step (see the module docstring): ``[T]`` ints in APPROACH..AFTER."""
    T = len(command)
    trend = _opening_trend(opening) if opening is not None else np.zeros(T, dtype=int)
    touching = contact if contact is not None else np.zeros(T, dtype=bool)
    touched_before = np.cumsum(touching) > 0
    stage = np.where(touched_before, AFTER, APPROACH)
    stage = np.where(touching, CONTACT, stage)
    stage = np.where((command <= 0) & (trend > 0), OPEN, stage)
    stage = np.where((command > 0) & (trend < 0), CLOSE, stage)
    # merge short runs into the previous run (the first run stands)
    starts = np.flatnonzero(np.diff(stage, prepend=-1))
    ends = np.append(starts[1:], T)
    for s, e in zip(starts[1:], ends[1:]):
        if e - s < min_steps:
            stage[s:e] = stage[s - 1]
    return stage


def _stage_words(code: int, ep: EpisodeFields, closed: bool) -> tuple[str, str]:
    """(what the robot is doing, the imperative sub-action) for a stage."""
    obj = ep.names.objects[0] if ep.names.objects else "object"
    target = ep.names.target_name() or "target"
    verb = ep.names.verb
    if code == APPROACH:
        return f"moving the gripper toward the {target}", f"Move the gripper toward the {target}."
    if code == CLOSE:
        return "closing the gripper", "Close the gripper."
    if code == OPEN:
        return "opening the gripper", "Open the gripper."
    if code == CONTACT:
        if verb == "grasp":
            return (f"holding the {obj}" if closed else f"touching the {obj}"), f"Grasp and move the {obj}."
        doing = {"push": "pushing", "pull": "pulling", "press": "pressing", "turn": "turning"}.get(verb, "touching")
        return f"{doing} the {obj}", f"{doing[:-3].capitalize()} the {obj}." if doing != "touching" else f"Touch the {obj}."
    return f"moving the gripper after touching the {obj}", f"Move the gripper away from the {obj}."


def task_stage(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    command = ep.fields["gripper_command"]
    stages = task_stages(command, ep.fields.get("gripper_opening"), ep.fields.get("contact"), ctx.config.min_stage_steps)
    for t in keep:
        doing, _ = _stage_words(int(stages[t]), ep, command[t] > 0)
        q = ctx.pick([f"The robot's task is to {ep.instruction}. What is it doing at this moment?",
                      f"Which stage of the task '{ep.instruction}' is the robot in?"])  # fmt: skip
        yield QA((int(t),), q, f"It is {doing}.")


def next_subaction(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    command = ep.fields["gripper_command"]
    stages = task_stages(command, ep.fields.get("gripper_opening"), ep.fields.get("contact"), ctx.config.min_stage_steps)
    change = np.flatnonzero(np.diff(stages)) + 1  # first step of each later run
    for t in keep:
        later = change[change > t]
        if len(later):
            nxt = int(later[0])
            answer = _stage_words(int(stages[nxt]), ep, command[nxt] > 0)[1]
        else:  # the last stage: it goes on until the task is done
            answer = _stage_words(int(stages[t]), ep, command[t] > 0)[1][:-1] + " until the task is done; no other sub-action remains."
        q = ctx.pick([f"The robot's task is to {ep.instruction}. What should it do next?",
                      f"To {ep.instruction}, what is the robot's next sub-action?"])  # fmt: skip
        yield QA((int(t),), q, answer)


def frame_order(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    gap = ctx.config.frame_order_gap
    for t in keep:
        later = keep[keep >= t + gap]
        if not len(later):
            continue
        u = int(later[int(ctx.rng.integers(len(later)))])
        swap = bool(ctx.rng.integers(2))
        pair = (u, int(t)) if swap else (int(t), u)
        q = (f"<image>\n<image>\nThese two frames show the robot trying to {ep.instruction}. "
             "Which frame was taken first? Answer 'the first image' or 'the second image'.")  # fmt: skip
        yield QA(pair, q, "The second image." if swap else "The first image.")


# --------------------------------------------------------------------------- action-aligned planning


def future_trajectory(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    n, stride = ctx.config.trajectory_points, ctx.config.trajectory_stride
    steps = stride * np.arange(1, n + 1)
    keep = keep[keep + steps[-1] < ep.length]
    if not len(keep):
        return
    future = ep.fields["ee_pos"][keep[:, None] + steps[None, :]]  # [k, n, 3]
    pixels = _project(ep, future, keep)  # the camera as seen at the asked frame
    for t, pix in zip(keep, pixels):
        if not ctx.points_inside(pix):
            continue
        q = ctx.pick([
            f"The robot's task is to {ep.instruction}. Where will its gripper be over the next {steps[-1]} steps? "
            f"Give {n} points, one every {stride} steps.",
            f"Predict the gripper's path for the next {steps[-1]} steps as {n} points, one every {stride} steps, "
            f"while the robot tries to {ep.instruction}.",
        ])  # fmt: skip
        yield QA((int(t),), f"{q} {SHORT_POINT_FORMAT}", ctx.points(pix))


def gripper_next(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    closed = ep.fields["gripper_command"] > 0
    k = ctx.config.gripper_horizon
    for t in keep:
        ahead = closed[t + 1 : t + 1 + k]
        if len(ahead) < k:
            continue
        if closed[t] and not ahead.all():
            answer = "It will open."
        elif not closed[t] and ahead.any():
            answer = "It will close."
        else:
            answer = f"It will stay {'closed' if closed[t] else 'open'}."
        q = f"Over the next {k} steps, will the robot's gripper open, close, or stay as it is?"
        yield QA((int(t),), q, answer)


def action_chunk(ep: EpisodeFields, keep: np.ndarray, ctx: Context) -> Iterator[QA]:
    h, d = ctx.config.action_horizon, ctx.config.action_decimals
    actions = np.round(ep.fields["action"], d) + 0.0  # + 0.0: no "-0.0"
    for t in keep[keep + h <= ep.length]:
        chunk = actions[t : t + h]
        text = "[" + ", ".join("[" + ", ".join(f"{v:.{d}f}" for v in row) + "]" for row in chunk) + "]"
        q = (f"The robot's task is to {ep.instruction}. What are its next {h} actions? "
             f"Answer with a list of {h} actions of {chunk.shape[1]} numbers each.")  # fmt: skip
        yield QA((int(t),), q, text)


# --------------------------------------------------------------------------- registry


def _g(name, category, domain, needs, fn, help):
    return name, Generator(name, category, domain, tuple(needs), fn, help)


GENERATORS: dict[str, Generator] = dict([
    _g("relative_position", "scene_grounding", "Spatial", ["ee_pos", "objects"], relative_position,
       "direction (robot frame) and distance bucket of an object or the goal from the end effector"),
    _g("nearest_object", "scene_grounding", "Egocentric Understanding", ["ee_pos", "objects"], nearest_object,
       "which named object (or the goal) is nearest the gripper, asked only with a clear margin"),
    _g("point_object", "scene_grounding", "Grounding", ["objects", "camera"], point_object,
       "point to a named object: its projected 3-D position"),
    _g("gripper_point", "scene_grounding", "Egocentric Understanding", ["ee_pos", "camera"], gripper_point,
       "point to the gripper: the projected end-effector position"),
    _g("gripper_state", "scene_grounding", "Egocentric Understanding", ["gripper_opening"], gripper_state,
       "is the gripper open, closed, closing, opening, holding the object"),
    _g("camera_geometry", "scene_grounding", "Camera Prediction", ["ee_pos", "camera"], camera_geometry,
       "camera-gripper distance per frame; camera position and field of view once per episode"),
    _g("affordance_point", "task_oriented", "Grounding", ["camera", "objects|goal"], affordance_point,
       "the point to grasp/push/press/pull/turn (or reach) for the instruction"),
    _g("task_stage", "task_oriented", "Temporal Understanding", ["gripper_command"], task_stage,
       "the current stage of the task from gripper events and contact"),
    _g("next_subaction", "task_oriented", "Plan & Reasoning", ["gripper_command"], next_subaction,
       "the next sub-action: the next stage of the episode"),
    _g("frame_order", "task_oriented", "Temporal Understanding", ["frames"], frame_order,
       "which of two frames of the episode came first"),
    _g("future_trajectory", "action_aligned", "Plan & Reasoning", ["ee_pos", "camera"], future_trajectory,
       "the end effector's next positions as image keypoints"),
    _g("gripper_next", "action_aligned", "Egocentric Understanding", ["gripper_command"], gripper_next,
       "will the gripper open, close or stay over the next steps"),
    _g("action_chunk", "action_aligned", "Action-NTP", ["action"], action_chunk,
       "the next actions written as text"),
])  # fmt: skip
