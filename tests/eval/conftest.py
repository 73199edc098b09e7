"""Closed-loop evaluation tests. Those that simulate need metaworld + mujoco (the ``sim`` extra)
and an offscreen GL backend; the LIBERO ones also the ``libero`` extra."""

from __future__ import annotations

import importlib.util

import pytest

HAVE_SIM = importlib.util.find_spec("mujoco") is not None and importlib.util.find_spec("metaworld") is not None
HAVE_LIBERO = importlib.util.find_spec("libero") is not None

if HAVE_SIM:
    from midtrain.eval.rollout import import_triton_before_gl
    from midtrain.sim.metaworld_env import ensure_gl_backend

    ensure_gl_backend()  # choose MUJOCO_GL before any test imports mujoco, as the stages do
    # Some tests here render in the pytest process; Triton imported after a GL context segfaults
    # (see import_triton_before_gl), and later suites import torch._dynamo.
    import_triton_before_gl()



@pytest.fixture(scope="session")
def expert_dir(tmp_path_factory):
    from midtrain.eval.policies import save_scripted_policy

    return save_scripted_policy(tmp_path_factory.mktemp("policies") / "expert", "metaworld_expert")


@pytest.fixture(scope="session")
def expert_eval(tmp_path_factory, expert_dir):
    """One small expert evaluation (2 tasks x 2 episodes, in this process), shared by the tests
    that read its outputs: ``(out_dir, results)``."""
    if not HAVE_SIM:
        pytest.skip("the sim extra is not installed")
    from midtrain.eval.api import evaluate_policy
    from midtrain.eval.config import EvalSettings

    out = tmp_path_factory.mktemp("expert_eval")
    settings = EvalSettings(tasks=["push-v3", "drawer-open-v3"], episodes_per_task=2, max_steps=150, workers=1,
                            videos_per_task=1)  # fmt: skip
    return out, evaluate_policy(expert_dir, settings, out)
