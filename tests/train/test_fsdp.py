"""``train.fsdp``: which modules are sharded one by one, and the one-line errors before any work
(the two-process runs are in tests/sft/test_fsdp_processes.py and tests/vla/test_vla_cotrain.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from midtrain.config import ConfigError
from midtrain.runs import StageError
from midtrain.train import TrainSettings
from midtrain.train.fsdp import check_fsdp, transformer_blocks


def launch(kind: str = "MULTI_CPU", processes: int = 2):
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), num_processes=processes)


def test_the_language_models_decoder_layers_are_the_units_and_the_vision_tower_stays_in_the_root(loaded_vlm):
    vlm, _ = loaded_vlm("qwen2_vl")
    blocks = transformer_blocks(vlm)
    layers = list(vlm.model.language_model.layers)
    assert {id(b) for b in blocks} == {id(layer) for layer in layers} and len(blocks) == len(layers)
    assert blocks[0] is layers[-1]  # innermost (last) first
    assert not any(b in set(vlm.model.visual.modules()) for b in blocks)  # a text-only batch skips the tower


def test_a_model_without_blocks_to_wrap_stops_before_any_work(tiny_vlm, monkeypatch):
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    model = tiny_vlm("qwen2_vl")
    check_fsdp(launch(), TrainSettings(fsdp=True), model)  # the real class names its decoder layer
    for cls in vars(modeling_qwen2_vl).values():
        if isinstance(cls, type) and "_no_split_modules" in vars(cls):
            monkeypatch.setattr(cls, "_no_split_modules", None)
    with pytest.raises(StageError, match=r"^train.fsdp: model .* \(Qwen2VLForConditionalGeneration\) has no transformer "
                                         r"blocks to shard .* train it with DDP \(train.fsdp: false\)$"):  # fmt: skip
        check_fsdp(launch(), TrainSettings(fsdp=True), model)
    check_fsdp(launch(processes=1), TrainSettings(fsdp=True), model)  # one process trains the plain model
    check_fsdp(launch(), TrainSettings(fsdp=False), model)


def test_launch_and_config_errors():
    with pytest.raises(StageError, match=r"^accelerate launch --use_fsdp: midtrain shards the model itself"):
        check_fsdp(launch("FSDP"), TrainSettings(fsdp=True))
    with pytest.raises(StageError, match=r"^closed_loop_every: .* set closed_loop_every: 0 with train.fsdp"):
        check_fsdp(launch(), TrainSettings(fsdp=True), closed_loop=True)
    check_fsdp(launch(), TrainSettings(fsdp=False), closed_loop=True)
    with pytest.raises(ConfigError, match=r"^train.precision: fp16 .* use bf16 with train.fsdp$"):
        TrainSettings(fsdp=True, precision="fp16")
