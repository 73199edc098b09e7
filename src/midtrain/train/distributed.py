"""One stage run across the processes of ``accelerate launch`` (or ``torchrun``).

Every process runs the same stage function. Only the main process opens the stage
(:func:`midtrain.runs.stage_run`: manifest, lock, skip-if-complete, log); it tells the others
where the stage writes and whether there is anything to do, and the others follow with a
``StageRun`` of the same ``dir`` that never writes the manifest. A single process (no
launcher) is the plain ``stage_run``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from ..runs import RunDir, StageError, StageRun, stage_run


def make_accelerator(precision: str = "auto", device: str = "auto", find_unused_parameters: bool = False):
    """An ``accelerate.Accelerator`` for this process.

    ``precision``: ``auto`` = bf16 autocast on a GPU that supports it (else fp16 there), none on
    CPU. ``device``: ``cpu`` (or ``auto`` without a GPU) trains on CPU; several CPU processes talk
    over gloo. ``find_unused_parameters``: DDP must expect parameters that get no gradient in a
    step (e.g. a trainable vision tower and a text-only batch).
    """
    import torch

    import accelerate  # the train extra: pip install 'midtrain[train]' (the CLI says so when it is missing)
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not cpu and device.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {device!r} requested but no CUDA GPU is visible; use device: cpu or auto")
    if precision == "auto":
        mixed = "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    else:
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: start from a fresh accelerate state, so a second training stage in the same
        # process (a pipeline, a notebook) may use another precision or device.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        if not cpu and ":" in device:
            torch.cuda.set_device(torch.device(device))  # accelerate uses the current CUDA device
    return accelerate.Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=handlers)


def _broadcast(accelerator, obj: Any) -> Any:
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


@contextlib.contextmanager
def distributed_stage(accelerator, run_dir: RunDir, stage: str, config, inputs, force: bool = False):
    """``stage_run`` on the main process; on the others a ``StageRun`` of the same ``dir`` that writes no manifest."""
    if accelerator.num_processes == 1:
        with stage_run(run_dir, stage, config, inputs=inputs, force=force) as st:
            if getattr(st, "final_dir", None) is None:
                st.final_dir = st.dir
            yield st
        return
    if not accelerator.is_main_process:
        info = _broadcast(accelerator, None)
        if "error" in info:
            raise StageError(f"{stage}: the main process could not open the stage: {info['error']}")
        log = logging.getLogger(f"midtrain.{stage}.rank{accelerator.process_index}")
        follower = StageRun(run_dir, stage, config, {}, "", Path(info["dir"]), log)  # never writes a manifest
        follower.final_dir, follower.skipped_as_complete = Path(info["final_dir"]), info["skipped"]
        yield follower
        return
    with contextlib.ExitStack() as stack:
        try:
            st = stack.enter_context(stage_run(run_dir, stage, config, inputs=inputs, force=force))
        except BaseException as exc:
            _broadcast(accelerator, {"error": f"{type(exc).__name__}: {exc}"})
            raise
        final = getattr(st, "final_dir", None) or st.dir
        st.final_dir = final
        _broadcast(accelerator, {"dir": str(st.dir), "final_dir": str(final), "skipped": st.skipped_as_complete})
        yield st
