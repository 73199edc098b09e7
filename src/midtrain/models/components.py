"""midtrain's own model components, registered with transformers' Auto classes where models load.

The demo VLM (``demo_vlm.py``) is a LLaVA checkpoint whose vision tower
(``midtrain_efficientnet_lite``) and language model (``midtrain_bidirectional_text``) are not
transformers architectures, so ``AutoModelForImageTextToText.from_pretrained`` can build it only
once their configs and models are registered. Loading (:mod:`midtrain.models.loading`) calls
:func:`register_components` before reading any config; importing a module registers nothing.
"""

from __future__ import annotations

_registered = False


def register_components() -> None:
    """Register every midtrain component with ``AutoConfig`` / ``AutoModel`` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel

    from .bidirectional_text import MODEL_TYPE as TEXT_TYPE
    from .bidirectional_text import BidirectionalTextConfig, BidirectionalTextModel
    from .efficientnet_vision import MODEL_TYPE as VISION_TYPE
    from .efficientnet_vision import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel

    for model_type, config_cls, model_cls in (
        (VISION_TYPE, EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel),
        (TEXT_TYPE, BidirectionalTextConfig, BidirectionalTextModel),
    ):
        try:
            AutoConfig.register(model_type, config_cls)
        except ValueError:  # registered by an earlier call in this process
            pass
        try:
            AutoModel.register(config_cls, model_cls)
        except ValueError:
            pass
    _registered = True
