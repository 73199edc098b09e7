"""An alignment as files: what ``midtrain align`` trains on top of an assembled VLM, and putting it back.

An alignment directory holds ``projector.safetensors`` (the vision-language projector's weights)
and, when stage 2 trained LoRA adapters, peft's ``adapter_config.json`` + ``adapter_model.safetensors``.
Applied to the unaligned VLM it was trained from (same tower, language model and projector shape),
it gives the aligned VLM: a few MB instead of a whole checkpoint, which is how the demo's alignment
is shipped (:data:`midtrain.models.causal_demo_vlm.ALIGNED_DEMO`).
"""

from __future__ import annotations

from pathlib import Path

PROJECTOR_FILE = "projector.safetensors"


def save_alignment(vlm, peft_model, directory: Path, dtype=None) -> None:
    """Write ``vlm``'s projector and, under LoRA, ``peft_model``'s adapter into ``directory`` (``dtype``: cast on the way)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in vlm.model.multi_modal_projector.state_dict().items()}
    save_file(state, str(directory / PROJECTOR_FILE))
    if peft_model is not None:
        peft_model.save_pretrained(directory, safe_serialization=True)
        if dtype is not None:
            from safetensors.torch import load_file

            adapter = directory / "adapter_model.safetensors"
            save_file({k: v.to(dtype).contiguous() for k, v in load_file(str(adapter)).items()}, str(adapter))


def load_projector(vlm, directory: Path) -> None:
    from safetensors.torch import load_file

    state = {k: v.to(vlm.dtype) for k, v in load_file(str(directory / PROJECTOR_FILE)).items()}
    vlm.model.multi_modal_projector.load_state_dict(state, strict=True)


def apply_alignment(vlm, directory: Path):
    """``vlm`` (the unaligned VLM) with the alignment in ``directory``: the projector loaded and the LoRA adapter,
    if any, merged in. Returns the merged model (a plain transformers model again)."""
    load_projector(vlm, directory)
    if (directory / "adapter_config.json").exists():
        from peft import PeftModel

        vlm = PeftModel.from_pretrained(vlm, str(directory)).merge_and_unload()
    return vlm
