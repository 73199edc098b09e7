"""Sharded data parallelism (FSDP2, torch's ``fully_shard``) for the training loop (``train.fsdp: true``).

Under DDP every process holds the whole model, its gradients and the AdamW states (weights +
2 moments: 16 bytes per trainable fp32 parameter). Under FSDP each of ``P`` processes holds
``1/P`` of every parameter (dim 0 of each tensor, a ``DTensor`` shard), of its gradient and of
its optimizer states; a layer's full weights exist only while it runs (all-gathered before its
forward and again before its backward, resharded after), and gradients are reduce-scattered.
The loss, the data order and the optimizer step are the loop's own, so the curve is the one
process's curve at the same global batch, up to the order of float additions.

- :func:`shard_model`: ``fully_shard`` on every transformer block (the classes the model's
  Hugging Face ``_no_split_modules`` names, e.g. ``Qwen2VLDecoderLayer`` and
  ``Qwen2VLVisionBlock``), then on the root (embeddings, head, norms: the rest). On a GPU with
  ``precision: bf16`` (or ``auto``) blocks compute in bf16 and reduce gradients in fp32
  (``MixedPrecisionPolicy``); weights and optimizer states stay fp32 shards.
  ``train.gradient_checkpointing`` recomputes each block in the backward pass as without FSDP.
- :func:`check_fsdp`: the one-line errors before a stage does any work (a launch the loop cannot
  shard, a model without wrappable blocks), built on the meta device.
- :func:`save_sharded_state` / :func:`load_sharded_state`: a checkpoint's ``trainer_state/``
  holds ``shard-RRRRR-of-PPPPP.safetensors`` per process (its local shards of the trainable
  weights, the persistent buffers and the optimizer moments) and ``shards.json`` (process count,
  optimizer hyperparameters): no pickle. The task's loadable directory beside it is written on
  the main process from weights gathered to its CPU (:func:`full_weights`), so every checkpoint
  is an ordinary model / adapter / policy directory as without FSDP. Resuming needs the same
  number of processes (the shards are the same slices then); an unsharded checkpoint of a DDP
  run resumes under FSDP through the full state dict.
- :func:`gather_into_plain_module`: after the last step the main process's model becomes an
  ordinary module with full weights, so the stage writes the final model (LoRA merged) as
  without FSDP.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from ..runs import StageError

SHARDS_FILE = "shards.json"


def _shard_file(rank: int, processes: int) -> str:
    return f"shard-{rank:05d}-of-{processes:05d}.safetensors"


def fsdp_active(settings, accelerator) -> bool:
    """FSDP shards over processes; with one process ``train.fsdp`` trains the plain model."""
    return bool(getattr(settings, "fsdp", False)) and accelerator.num_processes > 1


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# --------------------------------------------------------------------------- wrapping


def block_class_names(model) -> set[str]:
    """Names of the transformer-block classes of every Hugging Face model inside ``model``."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(type(module), "_no_split_modules", None) or ())
    return names


def _language_models(model) -> dict[int, tuple[Any, Any]]:
    """``id(decoder) -> (vlm, decoder)`` for every VLM inside ``model`` (a peft wrapper finds the same one twice)."""
    from ..models.parts import find_parts

    found = {}
    for module in model.modules():
        try:
            parts = find_parts(module)
        except (StageError, AttributeError, TypeError):
            continue
        decoder = module.get_submodule(parts.language_model)
        found.setdefault(id(decoder), (module, decoder))
    return found


def transformer_blocks(model) -> list:
    """The modules FSDP wraps one by one: the blocks of each VLM's language model, innermost first.

    Only language-model blocks: every batch runs them on every process, as FSDP's per-unit
    all-gathers need. The vision tower, which a text-only batch skips, stays in the root unit with
    the embeddings and the head (gathered for every forward)."""
    names = block_class_names(model)
    return [m for _, d in _language_models(model).values() for m in reversed(list(d.modules())) if type(m).__name__ in names]


def _every_trainable_root_weight_in_the_loss(module, args, output):
    """Forward hook of the root unit: ``loss + 0 * sum(trainable root weights)``, so every process
    has a gradient (zero where unused) for each of them, as FSDP's reduce-scatter of the root unit
    needs when a batch skips a part (a text-only batch, the vision tower). Values are unchanged."""
    import torch
    from torch.distributed.tensor import DTensor

    if not torch.is_grad_enabled() or not isinstance(output, tuple):
        return output
    loss, *rest = output
    unsharded = [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    return (loss + 0.0 * sum(p.sum() for p in unsharded), *rest) if unsharded else output


def _no_blocks_error(what: str) -> StageError:
    return StageError(f"train.fsdp: {what} has no transformer blocks to shard one by one (its Hugging Face class names "
                      "none in its language model's _no_split_modules); train it with DDP (train.fsdp: false)")  # fmt: skip


def check_fsdp(accelerator, settings, model: str | Path | None = None, trust_remote_code: bool = False,
               closed_loop: bool = False) -> None:  # fmt: skip
    """One-line errors before any work: ``accelerate launch --use_fsdp`` (midtrain shards itself), a
    closed-loop callback (it runs the model on the main process alone), and a model whose blocks FSDP
    cannot wrap (found by building ``model`` on the meta device)."""
    if accelerator.distributed_type.name == "FSDP":
        raise StageError("accelerate launch --use_fsdp: midtrain shards the model itself; launch with --multi_gpu "
                         "(or torchrun) and set train.fsdp=true (docs/sft.md)")  # fmt: skip
    if not fsdp_active(settings, accelerator):
        return
    if closed_loop:
        raise StageError("closed_loop_every: closed-loop evaluation runs the policy on one process, which a sharded model "
                         "cannot; set closed_loop_every: 0 with train.fsdp and run midtrain eval on the saved policy")  # fmt: skip
    if model is None:
        return
    import torch
    from transformers import AutoModelForImageTextToText

    from ..models.loading import check_vlm

    config = check_vlm(model, trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    if not transformer_blocks(skeleton):
        raise _no_blocks_error(f"model {str(model)!r} ({type(skeleton).__name__})")


def shard_model(model, accelerator, forward_methods: tuple[str, ...] = ()):
    """``fully_shard`` every transformer block of ``model``, then ``model`` itself (in place; returns it).
    ``forward_methods``: methods besides ``forward`` the loop calls on the root (they gather its weights too)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    blocks = transformer_blocks(model)
    if not blocks:
        raise _no_blocks_error(type(model).__name__)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    if accelerator.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # gathered until its backward (the hook below)
    for vlm, _ in _language_models(model).values():
        # the first block's input requires grad even when the embeddings are frozen and the batch has no image
        # features: every process then reduce-scatters the blocks' gradients in the same order (layer 0 included)
        vlm.enable_input_require_grads()
    model.register_forward_hook(_every_trainable_root_weight_in_the_loss)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def local_state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes this process holds of the parameters and of the optimizer states (local shards only)."""
    import torch

    def size(t) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = sum(size(p) for p in model.parameters())
    states = sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"param_bytes": int(params), "optimizer_bytes": int(states)}


# --------------------------------------------------------------------------- full weights


def _gather_full(model) -> dict:
    """The full state dict on the main process's CPU (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _swap_parameters(model, full: dict) -> list[tuple[Any, str, Any]]:
    """Register a plain parameter holding the full weights in place of each shard; returns what to restore."""
    import torch.nn as nn

    swapped, made = [], {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if id(param) not in made:  # a tied weight stays one tensor
            made[id(param)] = nn.Parameter(full[name], requires_grad=param.requires_grad)
        swapped.append((module, attr, param))
        module._parameters[attr] = made[id(param)]
    return swapped


@contextlib.contextmanager
def full_weights(model, main: bool) -> Iterator[None]:
    """Inside, the main process's ``model`` holds its full weights as plain CPU tensors (to save it,
    not to run it); a collective: every process enters."""
    full = _gather_full(model)
    swapped = _swap_parameters(model, full) if main else []
    try:
        yield
    finally:
        for module, attr, param in swapped:
            module._parameters[attr] = param


def gather_into_plain_module(model, main: bool) -> None:
    """After training: the main process's ``model`` becomes an ordinary module with its full weights (the
    FSDP classes removed), which the stage saves or merges as without FSDP; a collective."""
    from torch.distributed.fsdp import FSDPModule

    full = _gather_full(model)
    if not main:
        return
    _swap_parameters(model, full)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.__class__ = next(b for b in type(module).__bases__ if b is not FSDPModule)


# --------------------------------------------------------------------------- sharded checkpoints


def _local(t):
    return (t.to_local() if hasattr(t, "to_local") else t).detach().contiguous().cpu()


def save_sharded_state(accelerator, tmp: Path, state_dir: Path, task, model, optimizer, keep_names: set[str]) -> None:
    """This process's shards of the trainable weights, buffers and optimizer states (every process calls
    this); the main process also writes ``shards.json`` and the task's directory from gathered weights."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model)
    optim = get_optimizer_state_dict(model, optimizer)
    tensors = {f"model/{k}": _local(v) for k, v in weights.items() if k in keep_names}
    for fqn, states in optim["state"].items():
        tensors.update({f"optim/{fqn}/{key}": _local(v) for key, v in states.items()})
    seen: set[int] = set()
    for key, t in tensors.items():  # tied weights: safetensors stores each name's own copy
        if t.numel() and t.data_ptr() in seen:
            tensors[key] = t.clone()
        seen.add(t.data_ptr())
    save_file(tensors, str(state_dir / _shard_file(accelerator.process_index, accelerator.num_processes)))
    main = accelerator.is_main_process
    with full_weights(model, main):
        if main:
            task.save_pretrained(tmp)
    if main:
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim["param_groups"]]
        (state_dir / SHARDS_FILE).write_text(json.dumps({"processes": accelerator.num_processes, "param_groups": groups}))


def is_sharded_checkpoint(state_dir: Path) -> bool:
    return (state_dir / SHARDS_FILE).is_file()


def load_sharded_state(accelerator, state_dir: Path, model, optimizer, expected: set[str]) -> None:
    """Restore this process's shards written by :func:`save_sharded_state` into the sharded ``model`` and
    its ``optimizer``; one-line errors when the checkpoint was sharded otherwise."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    info = json.loads((state_dir / SHARDS_FILE).read_text())
    procs = accelerator.num_processes
    if info["processes"] != procs or not is_sharded(model):
        raise StageError(f"{state_dir}: checkpoint sharded over {info['processes']} FSDP processes; resume with "
                         f"train.fsdp=true and {info['processes']} processes (this run: {procs}, fsdp "
                         f"{'on' if is_sharded(model) else 'off'}), or --force to start over")  # fmt: skip
    tensors = load_file(str(state_dir / _shard_file(accelerator.process_index, procs)))
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each name

    def like(name: str, local):
        ref = params.get(name)
        if isinstance(ref, DTensor) and local.dim() == ref.dim():
            local = local.to(ref.device)
            return DTensor.from_local(local, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride())
        return local.to(ref.device if ref is not None else accelerator.device)

    weights = {k[len("model/"):]: like(k[len("model/"):], v) for k, v in tensors.items() if k.startswith("model/")}
    missing = sorted(expected - set(weights))
    if missing:
        raise StageError(f"{state_dir}: checkpoint lacks {len(missing)} trainable weight(s) of this model (first: {missing[0]}); "
                         "it was written for another model or trainable set - rerun with --force to start over")  # fmt: skip
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            fqn, _, name = key[len("optim/"):].rpartition("/")
            state.setdefault(fqn, {})[name] = value if name == "step" else like(fqn, value)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": info["param_groups"]})
