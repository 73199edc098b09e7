"""Clear one-line errors for models that do not exist or are not VLMs."""

import pytest

from midtrain.models import ModelLoadError, load_vlm


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_vlm(tmp_path / "no-such-model")
    assert "no such directory" in str(exc.value) and "\n" not in str(exc.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_vlm(tmp_path)


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as exc:
        load_vlm("midtrain-test/definitely-not-a-model")
    msg = str(exc.value)
    assert "not found" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_text_only_model_is_not_a_vlm(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as exc:
        load_vlm(tmp_path)
    msg = str(exc.value)
    assert "'gpt2' model, not a vision-language model" in msg and "\n" not in msg


def test_bad_settings_are_named(tiny_vlm):
    with pytest.raises(ModelLoadError, match="attn_implementation 'fast'"):
        load_vlm(tiny_vlm("qwen2_vl"), attn_implementation="fast")
    with pytest.raises(ModelLoadError, match="dtype 'float8'"):
        load_vlm(tiny_vlm("qwen2_vl"), dtype="float8", device="cpu")


def test_cli_prints_one_line_for_a_missing_model(tmp_path, capsys):
    from midtrain.cli import main

    code = main(["featurize", "--run-dir", str(tmp_path), "model=/nonexistent/vlm", f"catalog={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("midtrain: error")]
    assert lines == ["midtrain: error: model '/nonexistent/vlm': no such directory"], err


def test_custom_code_needs_trust_remote_code(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "custom_vlm", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}'
    )
    (tmp_path / "configuration_custom.py").write_text(
        "from transformers import PretrainedConfig\n\nclass CustomConfig(PretrainedConfig):\n    model_type = 'custom_vlm'\n"
    )
    with pytest.raises(ModelLoadError, match="needs custom code from its repository; set trust_remote_code: true"):
        load_vlm(tmp_path)


def test_processor_settings_can_be_overridden(tiny_vlm):
    from midtrain.models import load_processor

    processor = load_processor(str(tiny_vlm("qwen2_vl")), max_pixels=28 * 28 * 9)
    assert processor.image_processor.size["longest_edge"] == 28 * 28 * 9


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_vlm_weights_file_is_named(tiny_vlm, tmp_path):
    import shutil

    copy = tmp_path / "vlm"
    shutil.copytree(tiny_vlm("qwen2_vl"), copy)
    _truncate(copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=rf"^{copy / 'model.safetensors'}: damaged weights file \(.*\); restore it"):
        load_vlm(copy, dtype="float32", device="cpu")
