"""Rendered tabletop scenes with ground truth: the Meta-World table, Sawyer arm and camera,
with coloured objects at random positions and the arm at a random pose.

Every object's 3D centre is projected into the image with the camera's intrinsics and
extrinsics (:meth:`CameraView.project`); a segmentation render says which objects are
visible and whether the projected centre lies on the object, so questions are asked only
about what can be seen and pointing answers land on the object. This is the embodied-oriented
(RoboPoint / RefSpatial-like) source of the synthetic VLM pool: same simulator and camera as the
robot corpus, different task (spatial question answering instead of acting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .metaworld_env import CameraView, import_mujoco, metaworld_asset_path

# Object colours (RGB in [0, 1]); red is left out because the Sawyer arm is red.
COLOURS: dict[str, tuple[float, float, float]] = {
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.55, 0.2, 0.75),
    "orange": (1.0, 0.5, 0.05),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.1, 0.8, 0.85),
    "pink": (1.0, 0.45, 0.7),
}
SHAPES: tuple[str, ...] = ("cube", "ball", "cylinder")
OBJECT_HALF_SIZE = 0.03  # metres: cube half edge, ball and cylinder radius, cylinder half height

# Where objects and the hand are placed (metres, Meta-World world frame; the table top is z = 0).
OBJECT_REGION = ((-0.45, 0.4), (0.45, 0.9))  # (x_min, y_min), (x_max, y_max)
HAND_REGION = ((-0.2, 0.45, 0.12), (0.2, 0.8, 0.3))
MIN_OBJECT_SPACING = 0.1
_HIDDEN = np.array([0.0, -10.0, -10.0])  # unused object slots are parked here, out of view
_SETTLE_STEPS = 200  # physics steps for the weld to bring the hand to its target pose
MIN_VISIBLE_PIXELS = 6


@dataclass
class SceneObject:
    """One object: ``position`` [3] world metres; ``pixel`` [2] (x, y) projected centre in pixels
    of the upright image; ``visible_pixels`` from the segmentation render; ``centre_visible`` is
    whether the pixel under the projected centre shows this object."""

    colour: str
    shape: str
    position: np.ndarray
    pixel: np.ndarray
    geom_id: int
    visible_pixels: int = 0
    centre_visible: bool = False

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def pointable(self) -> bool:
        return self.centre_visible and self.visible_pixels >= MIN_VISIBLE_PIXELS


@dataclass
class TabletopScene:
    """A rendered scene: ``image`` uint8 [H, W, 3], its objects and the gripper (tool centre
    point between the fingers) in world metres and projected pixels."""

    image: np.ndarray
    objects: list[SceneObject]
    gripper_position: np.ndarray
    gripper_pixel: np.ndarray
    segmentation: np.ndarray = field(repr=False)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    def visible_objects(self) -> list[SceneObject]:
        return [o for o in self.objects if o.pointable]


def build_tabletop_model(max_objects: int):
    """The Meta-World pick-place scene without its puck and goal marker, plus ``max_objects``
    slots per shape: static, collision-free bodies that a scene moves onto the table."""
    mujoco = import_mujoco()
    spec = mujoco.MjSpec.from_file(metaworld_asset_path("sawyer_xyz/sawyer_pick_place_v3.xml"))
    spec.detach_body(spec.body("obj"))
    spec.site("goal").group = 5  # site groups 3-5 are not rendered by default
    geom_types = {
        "cube": (mujoco.mjtGeom.mjGEOM_BOX, [OBJECT_HALF_SIZE] * 3),
        "ball": (mujoco.mjtGeom.mjGEOM_SPHERE, [OBJECT_HALF_SIZE, 0, 0]),
        "cylinder": (mujoco.mjtGeom.mjGEOM_CYLINDER, [OBJECT_HALF_SIZE, OBJECT_HALF_SIZE, 0]),
    }
    for shape in SHAPES:
        geom_type, size = geom_types[shape]
        for k in range(max_objects):
            body = spec.worldbody.add_body(name=f"{shape}_{k}", pos=_HIDDEN.tolist())
            body.add_geom(
                name=f"{shape}_{k}_geom", type=geom_type, size=size, rgba=[1, 1, 1, 1], contype=0, conaffinity=0
            )
    return spec.compile()


class TabletopSceneRenderer:
    """Renders random tabletop scenes; one MuJoCo model and renderer reused across scenes.

    Each scene starts from a reset ``MjData``, so a scene depends only on the generator passed
    to :meth:`render`, not on previous scenes.
    """

    def __init__(self, camera: str = "corner", width: int = 128, height: int = 128, max_objects: int = 4):
        mujoco = import_mujoco()
        self._mujoco = mujoco
        self.max_objects = max_objects
        self.model = build_tabletop_model(max_objects)
        self.data = mujoco.MjData(self.model)
        self.view = CameraView(self.model, camera, width, height)
        self.slots = {
            shape: [self.model.body(f"{shape}_{k}").id for k in range(max_objects)] for shape in SHAPES
        }  # fmt: skip
        self.mocap_id = int(self.model.body_mocapid[self.model.body("mocap").id])
        for i in range(self.model.neq):  # Meta-World's reset_mocap_welds: the hand follows the mocap body
            if self.model.eq_type[i] == mujoco.mjtEq.mjEQ_WELD:
                self.model.eq_data[i] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 5.0]
        self.finger_sites = [self.model.site("rightEndEffector").id, self.model.site("leftEndEffector").id]

    def _place_objects(self, rng: np.random.Generator, count: int) -> list[tuple[str, str, np.ndarray]]:
        (x0, y0), (x1, y1) = OBJECT_REGION
        combos = [(c, s) for c in COLOURS for s in SHAPES]
        chosen = rng.choice(len(combos), size=count, replace=False)
        placed: list[np.ndarray] = []
        while len(placed) < count:
            xy = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
            if all(np.linalg.norm(xy - p) >= MIN_OBJECT_SPACING for p in placed):
                placed.append(xy)
        return [
            (combos[i][0], combos[i][1], np.array([xy[0], xy[1], OBJECT_HALF_SIZE]))
            for i, xy in zip(chosen, placed)
        ]  # fmt: skip

    def render(self, rng: np.random.Generator, min_objects: int = 2) -> TabletopScene:
        mujoco, model, data = self._mujoco, self.model, self.data
        count = int(rng.integers(min_objects, self.max_objects + 1))
        layout = self._place_objects(rng, count)
        hand_low, hand_high = (np.array(b) for b in HAND_REGION)
        hand_target = rng.uniform(hand_low, hand_high)
        grip = 1.0 if rng.random() < 0.5 else -1.0

        for shape, bodies in self.slots.items():
            for body_id in bodies:
                model.body_pos[body_id] = _HIDDEN
        used = {s: 0 for s in SHAPES}
        objects = []
        for colour, shape, position in layout:
            body_id = self.slots[shape][used[shape]]
            used[shape] += 1
            model.body_pos[body_id] = position
            geom_id = int(model.body_geomadr[body_id])
            model.geom_rgba[geom_id] = (*COLOURS[colour], 1.0)
            objects.append(SceneObject(colour, shape, position, np.zeros(2), geom_id))

        mujoco.mj_resetData(model, data)
        data.mocap_pos[self.mocap_id] = hand_target
        data.mocap_quat[self.mocap_id] = [1, 0, 1, 0]  # Meta-World's gripper-down orientation
        data.ctrl[:2] = [grip, -grip]
        for _ in range(_SETTLE_STEPS):
            mujoco.mj_step(model, data)
        mujoco.mj_forward(model, data)

        image = self.view.rgb(data)
        segmentation = self.view.segmentation(data)
        pixels, _ = self.view.project(data, np.stack([o.position for o in objects]))
        h, w = segmentation.shape
        for obj, pixel in zip(objects, pixels):
            obj.pixel = pixel
            obj.visible_pixels = int((segmentation == obj.geom_id).sum())
            col, row = np.floor(pixel).astype(int)
            obj.centre_visible = bool(0 <= row < h and 0 <= col < w and segmentation[row, col] == obj.geom_id)
        gripper = data.site_xpos[self.finger_sites].mean(axis=0).copy()
        gripper_pixel, _ = self.view.project(data, gripper)
        return TabletopScene(image, objects, gripper, gripper_pixel[0], segmentation)

    def close(self) -> None:
        self.view.close()
