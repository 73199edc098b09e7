"""EfficientNet-Lite as a transformers vision model, so it can be a VLM's vision tower.

Registered with ``AutoConfig``/``AutoModel`` as ``midtrain_efficientnet_lite`` (by
:func:`midtrain.models.components.register_components`, which model loading calls), so a
LLaVA-architecture checkpoint whose ``vision_config`` names it loads through
``AutoModelForImageTextToText.from_pretrained``. The
final feature map ``[B, C, H/32, W/32]`` is returned as ``H/32 * W/32`` tokens of width C
(``last_hidden_state`` and the only entry of ``hidden_states``), the shape a LLaVA
projector expects from a vision tower. Used by the demo featurizer (``demo_vlm.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "midtrain_efficientnet_lite"
FEATURE_WIDTH = 1280  # channels of the Lite0 head convolution


class EfficientNetLiteVisionConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224, hidden_size: int = FEATURE_WIDTH,
                 patch_size: int = 32, **kwargs):  # fmt: skip
        self.variant = variant
        self.image_size = image_size
        self.hidden_size = hidden_size
        self.patch_size = patch_size  # the network's total stride: one token per 32x32 pixels
        super().__init__(**kwargs)


class EfficientNetLiteVisionModel(PreTrainedModel):
    config_class = EfficientNetLiteVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "efficientnet"
    # A convolutional network has no attention, so every attention implementation "works".
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: EfficientNetLiteVisionConfig):
        super().__init__(config)
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(config.variant)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Keep the implementation's own initialisation (weights come from a checkpoint)."""

    def load_efficientnet_weights(self, path: Path) -> None:
        """Load the ImageNet weights of the ``efficientnet-lite-pytorch`` implementation (strict)."""
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs) -> BaseModelOutputWithPooling:
        fmap = self.net.extract_features(pixel_values.to(self.dtype))
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(1), hidden_states=(tokens,))

