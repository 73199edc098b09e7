"""A damaged weights file of a policy directory (its head or its backbone: what ``midtrain eval
policy=DIR`` loads) is a one-line error naming the file."""

from __future__ import annotations

import shutil

import pytest

from midtrain.runs import StageError
from robot_data import policy_config, robot_rows


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def policy_dir(tiny_vlm, tmp_path_factory):
    from midtrain.policy import VLAPolicy

    rows = robot_rows(episodes=1, length=2, chunk=4)
    out = tmp_path_factory.mktemp("policy") / "p"
    VLAPolicy.build(policy_config("mlp", rows, chunk=4), tiny_vlm("qwen2_vl"), device="cpu", seed=0).save_pretrained(out)
    return out


@pytest.mark.parametrize("damaged", ["model.safetensors", "backbone/model.safetensors"])
def test_a_truncated_weights_file_of_a_policy_directory_is_named(policy_dir, tmp_path, damaged):
    from midtrain.eval.policies import load_policy

    copy = tmp_path / "p"
    shutil.copytree(policy_dir, copy)
    if not (copy / damaged).exists():  # the backbone's folder name comes from the policy config
        damaged = next(p.relative_to(copy).as_posix() for p in copy.rglob("*.safetensors") if p.parent != copy)
    _truncate(copy / damaged)
    with pytest.raises(StageError) as exc:
        load_policy(copy)
    message = str(exc.value)
    assert message.startswith(f"{copy / damaged}: damaged weights file") and "\n" not in message
