"""Tiny randomly initialised VLMs of the real architectures, built locally for tests and benchmarks.

Nothing is downloaded: a byte-level BPE tokenizer is trained with the ``tokenizers`` library on a
small built-in corpus, the architecture's special tokens are added, the architecture's *real*
processor class is assembled around it (with the chat template of the released checkpoints), the
model is built from a small config of the real architecture, and everything is saved with
``save_pretrained`` (weights in safetensors). The result loads through exactly the path a released
checkpoint takes: ``AutoProcessor.from_pretrained`` + ``AutoModelForImageTextToText.from_pretrained``
(see :func:`midtrain.models.loading.load_vlm`).

Sizes:

- ``test``: hidden 64, 2 layers, 56-112 px images, vocabulary = the trained tokenizer (about 1 M
  parameters, builds in about a second);
- ``bench``: hidden 384, 6 layers, 224 px images and the architecture's *released* vocabulary
  (:data:`RELEASED_VOCAB`, embeddings tied as in the small released checkpoints; e.g. 78 M
  parameters for Qwen2-VL, 58 M of them the 151,936-row embedding that is also the output head)
  for the CPU benchmark and demos; ``vocab_size=32000`` rebuilds the earlier 32 M-parameter model;
- ``1b``: about 1 B parameters (Qwen2-VL-2B-like widths) for GPU throughput / MFU measurements.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "paligemma", "internvl")
SIZES = ("test", "bench", "1b")

# A small English corpus of VQA- and robot-instruction-like text, so the tokenizer learns useful merges.
CORPUS = """\
pick up the red block and place it in the bowl
push the green button on the left side of the table
open the top drawer and put the sponge inside
close the microwave door then turn the knob to the right
move the blue cup next to the plate near the sink
stack the yellow cube on top of the purple cube
what is the robot arm holding in its gripper
how many objects are on the table in front of the robot
describe the image in detail
the image shows a kitchen with a white counter and a wooden cabinet
a cat is sitting on a mat next to a window
two people are walking along the beach at sunset
where is the mug relative to the laptop
the mug is to the left of the laptop and behind the notebook
is the door open or closed? the door is open
what color is the car parked on the street? it is red
slide the window open and reach for the handle
grasp the handle, rotate the faucet, and release
answer the question using a single word or phrase
the gripper moves down, closes, and lifts the object
spatial reasoning: which object is closer to the camera
the bottle is closer to the camera than the box
read the text on the sign: stop
a chart showing sales by month from january to december
count the apples in the basket: there are five apples
the robot should first locate the drawer then pull it open
""".splitlines()


@dataclass(frozen=True)
class TinySize:
    """Widths of one size preset (text decoder, vision encoder, image side in pixels, vocabulary)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_px: int
    vocab_size: int  # 0: the trained tokenizer's size; RELEASED: the architecture's released vocabulary


RELEASED = -1

# Vocabulary (rows of the embedding and of the output head) of a released checkpoint of each
# architecture, from its config.json. Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B and PaliGemma tie the
# output head to the embedding; the tiny models tie it in every architecture, so a large vocabulary
# adds one table, not two.
RELEASED_VOCAB = {
    "qwen2_vl": 151936,  # Qwen/Qwen2-VL-2B-Instruct
    "qwen2_5_vl": 151936,  # Qwen/Qwen2.5-VL-3B-Instruct
    "qwen3_vl": 151936,  # Qwen/Qwen3-VL-2B-Instruct
    "idefics3": 128259,  # HuggingFaceM4/Idefics3-8B-Llama3
    "smolvlm": 49280,  # HuggingFaceTB/SmolVLM-256M-Instruct
    "paligemma": 257216,  # google/paligemma-3b-pt-224
    "internvl": 151674,  # OpenGVLab/InternVL3-1B-hf
}


PRESETS = {
    "test": TinySize(64, 2, 4, 2, 128, 32, 2, 2, 64, 56, 0),
    "bench": TinySize(384, 6, 6, 2, 1536, 256, 6, 4, 1024, 224, RELEASED),
    "1b": TinySize(1536, 16, 12, 2, 8960, 1024, 16, 16, 4096, 448, 151936),
}


# --------------------------------------------------------------------------- chat templates
# The templates shipped with the released checkpoints (image/text content blocks), lightly trimmed
# of tool-calling branches. PaliGemma checkpoints ship none: midtrain renders a plain prompt for them.

QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN3_VL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

INTERNVL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
IDEFICS_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                    "<global-img>", "<video>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]  # fmt: skip
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
INTERNVL_SPECIALS = QWEN_SPECIALS + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def train_tokenizer(special_tokens: list[str], vocab_size: int = 600, **named_tokens):
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, wrapped as a transformers fast tokenizer.

    ``named_tokens`` are the usual ``bos_token=...``/``eos_token=...`` plus
    ``extra_special_tokens={name: token}`` for model-specific attributes (e.g. InternVL's
    ``context_image_token``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=32768, **named_tokens)


def _text_config(s: TinySize, vocab: int, tok, **extra) -> dict:
    head_dim = s.text_hidden // s.text_heads
    return dict(
        vocab_size=vocab, hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, num_key_value_heads=s.text_kv_heads,
        head_dim=head_dim, max_position_embeddings=32768,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )  # fmt: skip


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) as Qwen does (t gets the remainder)."""
    half = head_dim // 2
    hw = (half * 3) // 8
    return [half - 2 * hw, hw, hw]


def _qwen_family(arch: str, s: TinySize):
    import transformers as tf

    tok = train_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    patch = 16 if arch == "qwen3_vl" else 14
    unit = patch * 2  # spatial merge 2
    max_px = (s.image_px // unit * unit) ** 2
    ip = tf.Qwen2VLImageProcessor(
        min_pixels=unit * unit, max_pixels=max_px, patch_size=patch, merge_size=2, temporal_patch_size=2
    )
    size = {"shortest_edge": unit * unit, "longest_edge": max_px}
    if arch == "qwen3_vl":
        vp = tf.Qwen3VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
        proc = tf.Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN3_VL_TEMPLATE)
    else:
        vp = tf.Qwen2VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
        cls = tf.Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else tf.Qwen2VLProcessor
        proc = cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN2_VL_TEMPLATE)
    vocab = max(len(tok), s.vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    head_dim = s.text_hidden // s.text_heads
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope_section(head_dim)}
    if arch == "qwen2_vl":
        vision = dict(depth=s.vision_layers, embed_dim=s.vision_hidden, hidden_size=s.text_hidden,
                      num_heads=s.vision_heads, mlp_ratio=s.vision_intermediate // s.vision_hidden,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
        config = tf.Qwen2VLConfig(
            text_config=_text_config(s, vocab, tok, rope_parameters=rope), vision_config=vision,
            tie_word_embeddings=True, **token_ids,
        )  # fmt: skip
    elif arch == "qwen2_5_vl":
        vision = dict(depth=s.vision_layers, hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                      num_heads=s.vision_heads, out_hidden_size=s.text_hidden, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[s.vision_layers - 1])  # fmt: skip
        config = tf.Qwen2_5_VLConfig(
            text_config=_text_config(s, vocab, tok, rope_parameters=rope), vision_config=vision,
            tie_word_embeddings=True, **token_ids,
        )  # fmt: skip
    else:
        rope3 = {**rope, "mrope_interleaved": True}
        vision = dict(depth=s.vision_layers, hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                      num_heads=s.vision_heads, out_hidden_size=s.text_hidden, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=max(64, (s.image_px // patch) ** 2),
                      deepstack_visual_indexes=[max(0, s.vision_layers - 1)])  # fmt: skip
        config = tf.Qwen3VLConfig(
            text_config=_text_config(s, vocab, tok, rope_parameters=rope3), vision_config=vision,
            tie_word_embeddings=True, **token_ids,
        )  # fmt: skip
    cls = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": tf.Qwen3VLForConditionalGeneration}[arch]  # fmt: skip
    return cls, config, proc


def _idefics_family(arch: str, s: TinySize):
    import transformers as tf

    tok = train_tokenizer(
        IDEFICS_SPECIALS, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>"
    )
    patch = 14 if s.image_px % 14 == 0 else 16
    scale = 2
    image_seq_len = (s.image_px // patch) ** 2 // scale**2
    ip_kwargs = dict(size={"longest_edge": s.image_px}, max_image_size={"longest_edge": s.image_px},
                     do_image_splitting=False)  # fmt: skip
    if arch == "smolvlm":
        ip = tf.SmolVLMImageProcessor(**ip_kwargs)
        vp = tf.SmolVLMVideoProcessor(size={"longest_edge": s.image_px}, max_image_size={"longest_edge": s.image_px})
        proc = tf.SmolVLMProcessor(
            image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=image_seq_len,
            chat_template=SMOLVLM_TEMPLATE,
        )  # fmt: skip
    else:
        ip = tf.Idefics3ImageProcessor(**ip_kwargs)
        proc = tf.Idefics3Processor(
            image_processor=ip, tokenizer=tok, image_seq_len=image_seq_len, chat_template=SMOLVLM_TEMPLATE
        )
    vocab = max(len(tok), s.vocab_size)
    vision = dict(hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate, num_hidden_layers=s.vision_layers,
                  num_attention_heads=s.vision_heads, image_size=s.image_px, patch_size=patch)  # fmt: skip
    text = {**_text_config(s, vocab, tok), "model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    cfg_cls, model_cls = (
        (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration)
        if arch == "smolvlm"
        else (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration)
    )
    config = cfg_cls(
        vision_config=vision, text_config=text, scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=True,
    )  # fmt: skip
    return model_cls, config, proc


def _paligemma(s: TinySize):
    import transformers as tf

    tok = train_tokenizer(GEMMA_SPECIALS, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    patch = 14 if s.image_px % 14 == 0 else 16
    ip = tf.SiglipImageProcessor(size={"height": s.image_px, "width": s.image_px})
    ip.image_seq_length = (s.image_px // patch) ** 2
    proc = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <image> and the loc/seg tokens
    vocab = max(len(tok), s.vocab_size)
    vision = dict(model_type="siglip_vision_model", hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                  num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads, image_size=s.image_px,
                  patch_size=patch)  # fmt: skip
    text = {**_text_config(s, vocab, tok), "model_type": "gemma", "hidden_activation": "gelu_pytorch_tanh"}
    config = tf.PaliGemmaConfig(
        vision_config=vision, text_config=text, projection_dim=s.text_hidden, hidden_size=s.text_hidden,
        image_token_index=tok.convert_tokens_to_ids("<image>"), vocab_size=vocab,
    )  # fmt: skip
    return tf.PaliGemmaForConditionalGeneration, config, proc


def _internvl(s: TinySize):
    import transformers as tf

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}  # fmt: skip
    tok = train_tokenizer(
        INTERNVL_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=named
    )
    patch = 14 if s.image_px % 14 == 0 else 16
    image_seq_length = (s.image_px // patch) ** 2 // 4  # downsample_ratio 0.5 (pixel shuffle)
    # InternVLProcessor tiles images (crop_to_patches) as the released checkpoints do; few tiles when tiny.
    max_tiles = 2 if s.image_px < 112 else 12
    ip = tf.GotOcr2ImageProcessor(size={"height": s.image_px, "width": s.image_px}, max_patches=max_tiles)
    vp = tf.InternVLVideoProcessor(size={"height": s.image_px, "width": s.image_px})
    proc = tf.InternVLProcessor(
        image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=image_seq_length,
        chat_template=INTERNVL_TEMPLATE,
    )  # fmt: skip
    vocab = max(len(tok), s.vocab_size)
    vision = dict(hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate, num_hidden_layers=s.vision_layers,
                  num_attention_heads=s.vision_heads, image_size=[s.image_px, s.image_px], patch_size=[patch, patch])  # fmt: skip
    text = {**_text_config(s, vocab, tok), "model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}}
    config = tf.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length, downsample_ratio=0.5, tie_word_embeddings=True,
    )  # fmt: skip
    return tf.InternVLForConditionalGeneration, config, proc


def tiny_vlm_parts(arch: str, size: str = "test", vocab_size: int | None = None):
    """``(model_class, config, processor)`` of a tiny ``arch`` VLM; the model is not instantiated.

    Use this to build the model directly where it will run (e.g. ``with torch.device("cuda")``)
    instead of saving and reloading it. ``vocab_size`` overrides the preset's vocabulary (0: the
    trained tokenizer's size; never below it); see :func:`preset`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny VLM architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in PRESETS:
        raise ValueError(f"unknown tiny VLM size {size!r}; choose one of {', '.join(SIZES)}")
    s = preset(arch, size, vocab_size)
    if arch.startswith("qwen"):
        return _qwen_family(arch, s)
    if arch in ("idefics3", "smolvlm"):
        return _idefics_family(arch, s)
    if arch == "paligemma":
        return _paligemma(s)
    return _internvl(s)


def preset(arch: str, size: str, vocab_size: int | None = None) -> TinySize:
    """The widths ``size`` builds for ``arch``, with its vocabulary resolved (``vocab_size`` if
    given, else the preset's; :data:`RELEASED` becomes :data:`RELEASED_VOCAB` of ``arch``)."""
    s = PRESETS[size]
    vocab = s.vocab_size if vocab_size is None else vocab_size
    return replace(s, vocab_size=RELEASED_VOCAB[arch] if vocab == RELEASED else vocab)


def build_tiny_vlm(
    arch: str, out_dir: Path | str, size: str = "test", seed: int = 0, vocab_size: int | None = None
) -> Path:
    """Build a randomly initialised ``arch`` VLM with its real processor and save it to ``out_dir``.

    The directory is a regular Hugging Face checkpoint (``config.json``, ``model.safetensors``,
    tokenizer and processor files) plus ``midtrain_tiny.json`` describing what was built.
    Deterministic for a given ``seed``. Returns ``out_dir``.
    """
    import torch

    out_dir = Path(out_dir)
    model_cls, config, processor = tiny_vlm_parts(arch, size, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"arch": arch, "size": size, "seed": seed, "parameters": n_params,
            "vocab_size": int(config.get_text_config().vocab_size), "preset": asdict(preset(arch, size, vocab_size))}  # fmt: skip
    (out_dir / "midtrain_tiny.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
