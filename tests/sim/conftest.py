"""Simulation tests need metaworld + mujoco (the ``sim`` extra) and an offscreen GL backend."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("mujoco") is None or importlib.util.find_spec("metaworld") is None:
    pytest.skip("the sim extra is not installed (pip install 'midtrain[sim]')", allow_module_level=True)

from midtrain.sim.metaworld_env import ensure_gl_backend  # noqa: E402

# MuJoCo picks its GL backend when first imported: choose it (EGL, else OSMesa) before any test
# imports mujoco, as the stages do.
ensure_gl_backend()
