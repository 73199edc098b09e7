"""Assemble a LLaVA-architecture VLM from a pretrained vision tower and a pretrained causal LM.

LLaVA's layout (``LlavaForConditionalGeneration``; ``FastVlmForConditionalGeneration`` for the demo's
convolutional tower, the same layout for a ``[B, C, H, W]`` feature map): vision tower -> two-layer GELU MLP projector
(random, seeded: what alignment trains) -> language model over interleaved image and text tokens,
with the LM's tokenizer plus one ``<image>`` token and the LM's chat template extended so a
message's content may hold image blocks.

- The demo's parts (``efficientnet-lite0`` + ``smollm2``) build exactly the causal demo VLM
  (:func:`midtrain.models.causal_demo_vlm.build_causal_demo_vlm`), so an aligned demo VLM differs
  from ``midtrain demo``'s only by its trained weights.
- Otherwise the tower is the demo's EfficientNet-Lite0 or a CLIP / SigLIP vision model (hub id or
  directory; LLaVA's own choices: CLIP drops its CLS token and reads the penultimate layer, SigLIP
  keeps every token of its last layer), and the LM any ``AutoModelForCausalLM`` checkpoint with a
  chat template.

Every problem a user can cause is a one-line :class:`AssemblyError` raised before any training
(:func:`check_parts`): an LM that is not causal, a tokenizer without a chat template, a tower that
is not a supported vision model or whose token count does not follow from its image and patch
size, more image tokens than the LM's context.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runs import StageError
from .config import DEMO_LANGUAGE_MODEL, DEMO_TOWER

IMAGE_TOKEN = "<image>"
CLS_TOWERS = ("clip_vision_model",)  # towers whose first token is a class token (LLaVA drops it)
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
COMPOSITE_VISION = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}

# Lets a text-only chat template render content given as blocks: each message's blocks are joined into
# one string first (an image block becomes <image>, which the processor expands to the image's tokens).
BLOCKS_TO_TEXT = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.messages = ns.messages + [m] -%}"
    "{%- else -%}{%- set text = namespace(s='') -%}"
    "{%- for b in m['content'] -%}"
    "{%- if b['type'] == 'image' -%}{%- set text.s = text.s + '<image>' -%}"
    "{%- elif b['type'] == 'text' -%}{%- set text.s = text.s + b['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text.s}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


class AssemblyError(StageError):
    """The tower and the language model cannot be joined into a VLM; the message says why in one line."""


@dataclass
class TowerInfo:
    """What the projector joins: ``tokens`` image tokens of width ``width`` per image."""

    name: str
    config: Any  # the vision config of the LLaVA checkpoint
    width: int
    tokens: int
    image_size: int
    patch_size: int
    strategy: str  # LLaVA's vision_feature_select_strategy: default (drop CLS) or full
    feature_layer: int


@dataclass
class LanguageModelInfo:
    name: str
    config: Any
    width: int
    layers: int
    context: int
    chat_template: str


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _auto_config(name: str, what: str):
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.is_dir():
        raise AssemblyError(f"{what} {name!r}: no such directory")
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else name)
    except (OSError, ValueError, KeyError) as exc:
        raise AssemblyError(f"{what} {name!r}: cannot read its config ({_first_line(exc)})") from None


def tower_info(name: str) -> TowerInfo:
    """The tower's vision config and token geometry (reads config files only)."""
    if name == DEMO_TOWER:
        from ..models.demo_parts import IMAGE_SIZE, LITE0_WIDTH, STRIDE, timm_vision_config

        side = IMAGE_SIZE // STRIDE
        return TowerInfo(name, timm_vision_config(), LITE0_WIDTH, side * side, IMAGE_SIZE, STRIDE, "full", -1)
    config = _auto_config(name, "vision_tower")
    vc = getattr(config, "vision_config", None) if config.model_type in COMPOSITE_VISION else config
    if vc is None or vc.model_type not in VISION_TYPES:
        raise AssemblyError(f"vision_tower {name!r} is a {config.model_type!r} model; align takes {DEMO_TOWER} or a CLIP / "
                            "SigLIP (vision) model")  # fmt: skip
    if vc.image_size % vc.patch_size:
        raise AssemblyError(f"vision_tower {name!r}: image size {vc.image_size} is not a multiple of its patch size "
                            f"{vc.patch_size}, so its image-token count is not whole")  # fmt: skip
    side = vc.image_size // vc.patch_size
    cls = vc.model_type in CLS_TOWERS
    return TowerInfo(name, vc, vc.hidden_size, side * side, vc.image_size, vc.patch_size, "default" if cls else "full",
                     -2 if cls else -1)  # fmt: skip


def language_model_info(name: str, text_layers: int | None) -> LanguageModelInfo:
    """The LM's config and chat template, after checking it is causal and has one (reads config files only)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if name == DEMO_LANGUAGE_MODEL:
        from ..models.causal_demo_vlm import SMOLLM2_LAYERS
        from ..models.smollm2 import CHAT_TEMPLATE, smollm2_dir

        smollm2_dir()  # installed, or a one-line install hint
        layers = _layers(name, SMOLLM2_LAYERS, text_layers)
        return LanguageModelInfo(name, None, 576, layers, 8192, CHAT_TEMPLATE)
    config = _auto_config(name, "language_model")
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES  # BERT-likes: bidirectional, a causal head aside
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder or getattr(config, "is_encoder_decoder", False):
        raise AssemblyError(f"language_model {name!r} is a {config.model_type!r} model, not a causal language model "
                            "(AutoModelForCausalLM): a VLM generates its answers token by token")  # fmt: skip
    template = _chat_template(name)
    total = int(getattr(config, "num_hidden_layers", 0) or 0)
    context = int(getattr(config, "max_position_embeddings", 0) or 0) or 1 << 20
    return LanguageModelInfo(name, config, int(config.hidden_size), _layers(name, total, text_layers), context, template)


def _layers(name: str, total: int, text_layers: int | None) -> int:
    if text_layers is not None and not 1 <= text_layers <= total:
        raise AssemblyError(f"text_layers: {name!r} has {total} decoder layers; got {text_layers}")
    return total if text_layers is None else int(text_layers)


def _chat_template(name: str) -> str:
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
    except (OSError, ValueError) as exc:
        raise AssemblyError(f"language_model {name!r}: cannot load its tokenizer ({_first_line(exc)})") from None
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise AssemblyError(f"language_model {name!r}: its tokenizer has no chat template, so questions and answers "
                            "cannot be told apart; use an instruction-tuned checkpoint")  # fmt: skip
    return template


def check_parts(vision_tower: str, language_model: str, text_layers: int | None, max_length: int) -> tuple[TowerInfo, LanguageModelInfo]:
    """One-line :class:`AssemblyError` for parts that cannot be joined; both parts' facts otherwise."""
    tower = tower_info(vision_tower)
    lm = language_model_info(language_model, text_layers)
    if tower.width < 1 or lm.width < 1:
        raise AssemblyError(f"vision_tower {vision_tower!r} (width {tower.width}) and language_model {language_model!r} "
                            f"(width {lm.width}): a projector needs both widths")  # fmt: skip
    if tower.tokens >= min(lm.context, max_length):
        raise AssemblyError(f"vision_tower {vision_tower!r} gives {tower.tokens} image tokens per image, which leaves no room "
                            f"for text in max_length {max_length} / the LM's context of {lm.context} tokens")  # fmt: skip
    return tower, lm


def assemble_vlm(out_dir: Path, vision_tower: str, language_model: str, text_layers: int | None, seed: int) -> Path:
    """Build the unaligned VLM (random projector, seeded) and save it as a checkpoint in ``out_dir``."""
    tower, lm_info = check_parts(vision_tower, language_model, text_layers, 1 << 30)
    if vision_tower == DEMO_TOWER and language_model == DEMO_LANGUAGE_MODEL:
        from ..models.causal_demo_vlm import build_causal_demo_vlm

        return build_causal_demo_vlm(out_dir, seed=seed, text_layers=text_layers)
    return _assemble_generic(Path(out_dir), tower, lm_info, text_layers, seed)


def _load_causal_lm(info: LanguageModelInfo):
    if info.name == DEMO_LANGUAGE_MODEL:
        from ..models.smollm2 import load_smollm2

        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(info.name).expanduser()
    name = str(path) if path.is_dir() else info.name
    return AutoModelForCausalLM.from_pretrained(name, dtype="float32").eval(), AutoTokenizer.from_pretrained(name)


def _tower_weights(info: TowerInfo) -> dict:
    """The tower's state dict, keyed as LLaVA's ``vision_tower`` module holds it."""
    from transformers import AutoModel

    path = Path(info.name).expanduser()
    model = AutoModel.from_pretrained(str(path) if path.is_dir() else info.name, dtype="float32")
    vision = getattr(model, "vision_model", model)
    return {f"vision_model.{k}": v for k, v in vision.state_dict().items()} if vision is not model else model.state_dict()


def _image_processor(info: TowerInfo):
    from transformers import AutoImageProcessor

    path = Path(info.name).expanduser()
    return AutoImageProcessor.from_pretrained(str(path) if path.is_dir() else info.name)


def _assemble_generic(out_dir: Path, tower: TowerInfo, lm_info: LanguageModelInfo, text_layers: int | None, seed: int) -> Path:
    import torch
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from ..models.demo_parts import demo_processor, save_demo_vlm

    lm, tokenizer = _load_causal_lm(lm_info)
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = copy.deepcopy(lm.config)
    text_config.num_hidden_layers = lm_info.layers
    if hasattr(text_config, "layer_types") and text_config.layer_types is not None:
        text_config.layer_types = text_config.layer_types[: lm_info.layers]
    text_config.vocab_size = len(tokenizer)
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    if tower.name == DEMO_TOWER:  # FastVLM's container: a convolutional timm tower that plain transformers loads
        from ..models.causal_demo_vlm import lite0_vlm

        text_config.tie_word_embeddings = tied
        model = lite0_vlm(text_config, image_token_id, seed)
    else:
        config = LlavaConfig(vision_config=tower.config, text_config=text_config, image_token_id=image_token_id,
                             vision_feature_select_strategy=tower.strategy, vision_feature_layer=tower.feature_layer,
                             projector_hidden_act="gelu", tie_word_embeddings=tied)  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration(config).eval()
            torch.manual_seed(seed)  # the projector from the seed alone, whatever the constructor drew before it
            for module in model.model.multi_modal_projector.modules():
                if isinstance(module, torch.nn.Linear):
                    model._init_weights(module)
        model.model.vision_tower.load_state_dict(_tower_weights(tower), strict=True)
    decoder = lm.get_decoder()
    state = {k: v for k, v in decoder.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < lm_info.layers}  # fmt: skip
    embeddings = state.pop("embed_tokens.weight")
    result = model.model.language_model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"embed_tokens.weight"}:
        raise AssemblyError(f"language_model {lm_info.name!r}: its weights do not fit a {text_config.model_type} decoder "
                            f"({(result.unexpected_keys or result.missing_keys)[0]})")  # fmt: skip
    with torch.no_grad():
        table = model.model.language_model.embed_tokens.weight
        table[: embeddings.shape[0]] = embeddings
        table[embeddings.shape[0] :] = embeddings.mean(0)  # new tokens: the mean row, as resize_token_embeddings does
        if not tied:
            head = lm.get_output_embeddings().weight
            model.lm_head.weight[: head.shape[0]] = head
            model.lm_head.weight[head.shape[0] :] = head.mean(0)
    eos = tokenizer.eos_token_id if lm.generation_config.eos_token_id is None else lm.generation_config.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=lm.generation_config.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)  # fmt: skip
    template = BLOCKS_TO_TEXT + lm_info.chat_template
    if tower.name == DEMO_TOWER:
        processor = demo_processor(tokenizer, template)
    else:
        processor = LlavaProcessor(image_processor=_image_processor(tower), tokenizer=tokenizer, patch_size=tower.patch_size,
                                   vision_feature_select_strategy=tower.strategy,
                                   num_additional_image_tokens=1 if tower.strategy == "default" else 0,
                                   chat_template=template, image_token=IMAGE_TOKEN)  # fmt: skip
    info = {"arch": type(model).__name__, "language_model": lm_info.name, "text_layers": lm_info.layers,
            "vision_tower": tower.name, "image_tokens": tower.tokens, "projector": "random init", "seed": seed}  # fmt: skip
    return save_demo_vlm(model, processor, out_dir, info)
