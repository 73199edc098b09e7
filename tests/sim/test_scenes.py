"""Tabletop scenes: projected ground-truth points land on the objects."""

from __future__ import annotations

import numpy as np
import pytest

from midtrain.sim.scenes import COLOURS, TabletopSceneRenderer


@pytest.fixture(scope="module")
def scenes():
    renderer = TabletopSceneRenderer("corner", 96, 96, max_objects=4)
    try:
        yield [renderer.render(np.random.default_rng(seed)) for seed in range(6)]
    finally:
        renderer.close()


def _nearest_palette_colour(pixel: np.ndarray) -> str:
    """The object colour whose RGB direction is closest to the rendered pixel (shading scales
    brightness, so compare directions)."""
    p = pixel.astype(np.float64) / (np.linalg.norm(pixel) + 1e-9)
    return max(COLOURS, key=lambda name: p @ (np.array(COLOURS[name]) / np.linalg.norm(COLOURS[name])))


def test_projected_centres_land_on_their_objects(scenes):
    objects = [(scene, obj) for scene in scenes for obj in scene.objects]
    on_object = [obj.centre_visible for _, obj in objects]
    assert len(objects) >= 12
    assert np.mean(on_object) >= 0.85  # only the arm can hide an object
    for scene, obj in objects:
        if not obj.pointable:
            continue
        col, row = np.floor(obj.pixel).astype(int)
        # the RGB render, independently of the segmentation, shows the object's colour there
        assert _nearest_palette_colour(scene.image[row, col]) == obj.colour, (obj.name, scene.image[row, col])
        ys, xs = np.nonzero(scene.segmentation == obj.geom_id)
        if obj.visible_pixels >= 12:
            assert np.hypot(xs.mean() + 0.5 - obj.pixel[0], ys.mean() + 0.5 - obj.pixel[1]) < 2.0


def test_scene_objects_are_distinct_and_on_the_table(scenes):
    for scene in scenes:
        names = [o.name for o in scene.objects]
        assert len(set(names)) == len(names) and 2 <= len(names) <= 4
        for obj in scene.objects:
            assert obj.position[2] > 0 and np.all(np.isfinite(obj.pixel))
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8


def test_scenes_depend_only_on_their_generator():
    renderer = TabletopSceneRenderer("corner", 48, 48, max_objects=3)
    try:
        a = renderer.render(np.random.default_rng(5))
        renderer.render(np.random.default_rng(6))
        b = renderer.render(np.random.default_rng(5))
    finally:
        renderer.close()
    np.testing.assert_array_equal(a.image, b.image)
    assert [o.name for o in a.objects] == [o.name for o in b.objects]
    np.testing.assert_array_equal(a.gripper_position, b.gripper_position)
