"""``midtrain sft``: supervised fine-tuning (mid-training) of a VLM on the selected mixture.

The recipe, top to bottom (:func:`run_sft`):

1. check the model is a VLM and its processor has a chat template (before any work);
2. open the stage on the main process (:func:`midtrain.train.distributed_stage`), the other
   processes of ``accelerate launch`` follow;
3. draw and measure the training data once (:mod:`midtrain.sft.data`: ``data/pool.arrow``,
   ``samples.parquet``, ``composition.json``);
4. load the VLM in fp32, choose what trains (:mod:`midtrain.sft.model`: full / LoRA, vision
   tower, projector), log the trainable parameters per module;
5. train with the shared loop (:func:`midtrain.train.train`: ``metrics.jsonl``,
   ``checkpoints/step-NNNNNN/``, exact resume after a kill);
6. write the final model (``model/``: full weights, or for LoRA the merged model) in the input
   checkpoint's dtype with its processor, loadable with ``load_vlm`` / ``from_pretrained``, plus
   ``loss_curves.png`` and ``composition.png``.

Outputs in ``<run>/<name>/`` (``name`` defaults to ``sft``): ``model/``, ``checkpoints/``,
``metrics.jsonl``, ``data/``, ``composition.json``, the figures, ``manifest.json`` (config,
inputs, counts, trainable parameters per module, the composition, the training summary).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from ..models.loading import check_vlm, load_processor, load_vlm
from ..runs import RunDir, StageError
from ..devices import torch_threads
from ..train import distributed_stage, make_accelerator, read_metrics, train
from ..train.fsdp import check_fsdp
from .config import SFTConfig
from .data import (COMPOSITION_FILE, DATA_DIR, InputIndex, catalog_source_files, collate_sft, draw_and_prepare,
                   load_prepared, materialize_datasets)  # fmt: skip
from .model import SFTModel, apply_training_mode, find_parts, parameter_counts, read_checkpoint_dtype, save_model
from ..train.plots import plot_loss_curves
from .plots import plot_composition

PLAIN_PROMPT_PROCESSORS = ("PaliGemmaProcessor",)  # trained on "<image>... prefix\nsuffix" prompts, no chat template
FINAL_MODEL = "model"


class SFTTask:
    """The :class:`midtrain.train.TrainTask` of SFT: the wrapped VLM, the prepared data, batches, saving."""

    def __init__(self, model: SFTModel, processor, data, config: SFTConfig, peft_model=None):
        self.model, self.processor, self.config, self.peft_model = model, processor, config, peft_model
        self.train_dataset = data.train
        self.eval_dataset = data.val if len(data.val) else None
        self.lengths, self.eval_lengths = data.train_lengths, data.val_lengths
        self.find_unused_parameters = config.vision != "frozen" or config.train_projector

    def collate(self, rows: list[dict]) -> dict:
        return collate_sft(rows, self.processor, self.config.max_length, self.config.overlong)

    def save_pretrained(self, directory: Path) -> None:
        """A checkpoint: the full model (``mode: full``) or the LoRA adapter (with any trained vision
        blocks / projector as ``modules_to_save``), and the processor."""
        (self.peft_model or self.model.vlm).save_pretrained(directory, safe_serialization=True)
        self.processor.save_pretrained(directory)


def check_processor(processor, model: str) -> None:
    """One-line errors, before any training, for processors SFT cannot build labels with."""
    if processor.chat_template is None and type(processor).__name__ not in PLAIN_PROMPT_PROCESSORS:
        raise StageError(
            f"model {model!r}: its processor has no chat template, so prompt and answer tokens cannot be told apart; "
            "use an instruction-tuned checkpoint or pass processor_kwargs: {chat_template: '<jinja template>'}"
        )


def _data_inputs(config: SFTConfig, run_dir: RunDir):
    """The data inputs (for the fingerprint), which kind they are, and the resolved ETC domains (or None)."""
    etc = None
    extra: dict[str, Path] = {}
    if config.etc:
        from ..etc.compositions import resolve_etc

        etc = resolve_etc(config.etc, run_dir.root, "etc")
        taken = {d.name for d in config.datasets} | set(config.sources)
        clash = [s.name for s in etc.sources if s.name in taken]
        if clash:
            raise StageError(f"etc: the ETC source {clash[0]!r} has the name of another input; rename that input")
        extra = {f"dataset/{s.name}": Path(s.path) for s in etc.sources}
    if config.datasets:
        return {**{f"dataset/{d.name}": Path(d.path) for d in config.datasets}, **extra}, "datasets", etc
    if config.sources:
        catalog = Path(config.catalog) if config.catalog else run_dir.require("catalog")
        catalog_source_files(catalog, config.sources)  # every source exists, or a one-line error naming the others
        return {**{f"catalog/{s}": catalog / s for s in config.sources}, **extra}, "sources", etc
    if etc is not None and config.mixture_file is None:
        return extra, "etc", etc
    path = Path(config.mixture_file) if config.mixture_file else run_dir.require("export") / "mixture.parquet"
    if not path.is_file():
        raise StageError(f"{path}: no mixture Parquet to train on (run export with parquet: true, or set mixture_file, "
                         "sources or datasets)")  # fmt: skip
    return {"mixture": path, **extra}, "mixture", etc


def _input_files(config: SFTConfig, inputs: dict[str, Path], kind: str, etc, data_dir: Path, st) -> list[Path]:
    etc_sources = etc.sources if etc is not None else []
    if kind in ("datasets", "etc"):
        st.current_shard = "data"
        return materialize_datasets(list(config.datasets) + etc_sources, config.seed, data_dir / "inputs", st)
    if etc_sources:
        st.current_shard = "data"
    extra = materialize_datasets(etc_sources, config.seed, data_dir / "inputs", st) if etc_sources else []
    if kind == "sources":
        catalog = next(p for k, p in inputs.items() if k.startswith("catalog/")).parent
        return catalog_source_files(catalog, config.sources) + extra
    return [inputs["mixture"]] + extra


def _with_etc_weights(config: SFTConfig, etc) -> SFTConfig:
    """ETC domains drawn at a fixed budget are weighted evenly per reference (Rethinking's compositions)
    unless ``mixture.weights`` names the weights."""
    if etc is None or config.mixture.weights or not config.mixture.budget:
        return config
    return dataclasses.replace(config, mixture=dataclasses.replace(config.mixture, weights=dict(etc.weights)))


def _wait_for(path: Path, accelerator) -> None:
    """Non-main processes wait for the main one to prepare the data (a file poll: preparing a
    large pool can outlast a collective's timeout)."""
    while not path.exists():
        time.sleep(2.0)
    accelerator.wait_for_everyone()


def run_sft(config: SFTConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Run ``midtrain sft`` into ``<run>/<config.name>``; returns that directory."""
    model_config = check_vlm(config.model, config.trust_remote_code)  # fail fast: exists, is a VLM
    inputs, kind, etc = _data_inputs(config, run_dir)
    fingerprint_inputs = dict(inputs)
    if Path(config.model).expanduser().is_dir():
        fingerprint_inputs["model"] = Path(config.model).expanduser()
    accelerator = make_accelerator(config.train.precision, config.device,
                                   find_unused_parameters=config.vision != "frozen" or config.train_projector)  # fmt: skip
    check_fsdp(accelerator, config.train, config.model, config.trust_remote_code)  # train.fsdp: blocks to shard (train/fsdp.py)
    with torch_threads(config.num_threads), distributed_stage(accelerator, run_dir, config.name, config, fingerprint_inputs,
                                                              force) as st:  # fmt: skip
        if st.skipped_as_complete:
            return st.final_dir
        main = accelerator.is_main_process
        processor = load_processor(config.model, config.trust_remote_code, **config.processor_kwargs)
        check_processor(processor, config.model)

        # -- data: drawn and measured once ------------------------------------------------------
        data_dir = Path(st.dir) / DATA_DIR
        if main:
            if not (data_dir / COMPOSITION_FILE).exists():
                if data_dir.exists():
                    shutil.rmtree(data_dir)  # a preparation cut short: start it over
                data_dir.mkdir(parents=True)
                with st.timed("prepare_data"):
                    index = InputIndex.build(_input_files(config, inputs, kind, etc, data_dir, st))
                    st.current_shard = "data"
                    draw_and_prepare(_with_etc_weights(config, etc), index, processor, data_dir, st)
                    st.mark_shard_done("data")
                    st.current_shard = None
            accelerator.wait_for_everyone()
        else:
            _wait_for(data_dir / COMPOSITION_FILE, accelerator)
        data = load_prepared(data_dir)
        if main:
            shutil.copyfile(data_dir / COMPOSITION_FILE, Path(st.dir) / COMPOSITION_FILE)
            plot_composition(data.composition, Path(st.dir) / "composition.png")
            st.counts.update({"train_samples": len(data.train), "val_samples": len(data.val),
                              "train_tokens": int(data.train_lengths.sum()),
                              "truncated": int(data.composition.get("truncated", 0))})  # fmt: skip
            st.extra["composition"] = data.composition

        # -- model: what trains ----------------------------------------------------------------
        import torch

        torch.manual_seed(config.train.seed)  # LoRA initialisation is part of the run's seed
        with st.timed("load_model"):
            vlm, _ = load_vlm(config.model, dtype="float32", device=str(accelerator.device),
                              attn_implementation=config.attn_implementation,
                              trust_remote_code=config.trust_remote_code, processor_kwargs=config.processor_kwargs)  # fmt: skip
        parts = find_parts(vlm)
        trained, peft_model = apply_training_mode(vlm, parts, config.mode, config.vision, config.vision_fraction,
                                                  config.train_projector, config.lora)  # fmt: skip
        counts = parameter_counts(trained, parts)
        if main:
            st.extra["parameters"] = counts
            st.extra["parts"] = {"language_model": parts.language_model, "vision_tower": parts.vision_tower,
                                 "projector": parts.projector, "vision_blocks": len(parts.vision_blocks)}  # fmt: skip
            for part, c in counts.items():
                st.log.info("parameters %-15s %12d total, %12d trainable", part, c["total"], c["trainable"])
        model = SFTModel(trained, peft_model, frozen_vision=parts.vision_tower if config.vision == "frozen" else None)
        task = SFTTask(model, processor, data, config, peft_model)

        # -- train -------------------------------------------------------------------------------
        with st.timed("train"):
            result = train(task, config.train, st, accelerator=accelerator)

        # -- the final model ---------------------------------------------------------------------
        if main:
            final = Path(st.dir) / FINAL_MODEL
            if final.exists():
                shutil.rmtree(final)
            dtype = read_checkpoint_dtype(config.model, model_config) if config.save_dtype == "auto" else config.save_dtype
            info = {"base_model": config.model, "mode": config.mode, "vision": config.vision,
                    "train_projector": config.train_projector, "steps": result.steps,
                    "final_checkpoint": result.final_checkpoint.name, "merged_lora": config.mode == "lora" and config.lora.merge}  # fmt: skip
            with st.timed("save_model"):
                if config.mode == "lora" and not config.lora.merge:
                    task.save_pretrained(final)
                    (final / "midtrain_sft.json").write_text(json.dumps(info, indent=2) + "\n")
                else:
                    out = peft_model.merge_and_unload() if peft_model is not None else trained
                    save_model(out, processor, final, dtype, info)
            rows = read_metrics(Path(st.dir) / "metrics.jsonl")
            plot_loss_curves(rows, Path(st.dir) / "loss_curves.png", f"{config.name}: {config.mode}, {Path(config.model).name}",
                             loss_label="train (answer-token cross-entropy, nats)")
            seconds = max(result.seconds, 1e-9)
            st.extra["train"] = {
                "steps": result.steps, "resumed_from": result.resumed_from, "processes": result.processes,
                "global_batch": result.global_batch, "train_loss": result.train_loss, **result.eval,
                "tokens": result.tokens, "samples": result.samples, "train_seconds": round(result.seconds, 2),
                "tokens_per_s": round(result.tokens / seconds, 1), "final_checkpoint": str(result.final_checkpoint.name),
                "fsdp": config.train.fsdp and result.processes > 1, "state_bytes_per_process": result.state_bytes,
            }  # fmt: skip
            st.extra["final_model"] = str(Path(st.final_dir) / FINAL_MODEL)
            st.extra["save_dtype"] = dtype
            st.log.info("sft done: %d steps, train loss %s, %s", result.steps, result.train_loss, result.eval)
    return st.final_dir

