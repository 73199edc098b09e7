"""``midtrain align``: LLaVA's two stages, on a VLM assembled from a pretrained tower and a pretrained causal LM.

The recipe, top to bottom (:func:`run_align`), as LLaVA's ``scripts/pretrain.sh`` then
``finetune.sh`` at this machine's scale:

1. check the parts can be joined (:func:`midtrain.align.assemble.check_parts`: one-line errors
   before any work);
2. ``base/``: the unaligned VLM - tower, random seeded projector, language model
   (:func:`~midtrain.align.assemble.assemble_vlm`);
3. ``corpus/``: the synthetic web (:mod:`midtrain.sim.web`), unless ``captions`` and
   ``instructions`` name the user's own data;
4. ``features/`` + ``data/``: both stages' samples encoded with the VLM's processor and chat
   template, and the frozen tower run once per distinct image (:mod:`midtrain.align.data`);
5. ``pretrain/``: stage 1, the projector alone on captions (LLaVA: feature alignment);
6. ``finetune/``: stage 2, projector + language model (LoRA adapters or all of it) on visual
   questions (LLaVA: visual instruction tuning);
7. ``model/``: the aligned VLM as an ordinary checkpoint (LoRA merged), loadable as ``model=`` by
   ``featurize``, ``sft``, ``vla``; ``aligned/``: only what alignment trained (projector, adapter),
   a few MB, which :func:`midtrain.models.alignment.apply_alignment` puts back onto ``base/``.

Both stages run the shared training loop (:func:`midtrain.train.train`: ``metrics.jsonl``,
checkpoints, exact resume after a kill) on the cached features: a step costs the projector and the
language model only. A finished stage is a shard of the run, so a resumed run skips it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..models.alignment import apply_alignment, load_projector, save_alignment
from ..models.forward import IGNORE, chunked_answer_loss, logit_softcap
from ..runs import RunDir, StageError, stage_run
from .config import AlignConfig

BASE, CORPUS, FINAL_MODEL, ALIGNED = "base", "corpus", "model", "aligned"
PHASES = ("pretrain", "finetune")


class AlignedVLM(nn.Module):
    """``model(batch) -> (loss, logs)`` on cached tower features: the projector's output replaces the
    ``<image>`` token embeddings (as ``LlavaModel.forward`` does), then the language model and the
    answer-token loss (:mod:`midtrain.models.forward`). ``net`` is the VLM or its ``PeftModel``."""

    def __init__(self, vlm, peft_model=None):
        super().__init__()
        self.net = peft_model if peft_model is not None else vlm
        object.__setattr__(self, "vlm", vlm)  # an alias, not a second registration
        self.image_token_id = vlm.config.image_token_id

    def train(self, mode: bool = True):
        super().train(mode)
        self.vlm.model.vision_tower.eval()  # never runs here; keeps batch-norm statistics as they are
        return self

    def hidden_states(self, input_ids, attention_mask, image_features):
        model = self.vlm.model
        embeds = model.language_model.get_input_embeddings()(input_ids)
        if image_features is not None:
            image = model.multi_modal_projector(image_features.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
            slots = (input_ids == self.image_token_id).unsqueeze(-1)
            if int(slots.sum()) != image.shape[0]:
                raise StageError(f"{int(slots.sum())} <image> tokens for {image.shape[0]} image features in a batch")
            embeds = embeds.masked_scatter(slots.expand_as(embeds), image)
        return model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, batch: dict[str, Any]):
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], batch.get("image_features"))
        labels = batch["labels"][:, 1:]
        answer = labels != IGNORE
        return chunked_answer_loss(hidden[:, :-1][answer], self.vlm.get_output_embeddings(), labels[answer],
                                   logit_softcap(self.vlm)), {}


@dataclass
class PhaseRun:
    """What :func:`midtrain.train.train` needs of a stage run, for one phase in a subfolder."""

    dir: Path
    final_dir: Path
    log: Any


class AlignTask:
    """The :class:`midtrain.train.TrainTask` of one phase."""

    def __init__(self, model: AlignedVLM, samples, cache, pad_id: int, projector_lr_scale: float = 1.0, peft_model=None):
        from .data import collate_aligned

        self.model, self.peft_model = model, peft_model
        self.train_dataset, self.eval_dataset = samples, None
        self.lengths = samples.lengths
        self._collate, self.cache, self.pad_id = collate_aligned, cache, pad_id
        self.projector_lr_scale = projector_lr_scale

    def collate(self, rows: list[dict]) -> dict:
        return self._collate(rows, self.cache, self.pad_id)

    def param_groups(self) -> list[dict]:
        projector = [p for n, p in self.model.named_parameters() if p.requires_grad and "multi_modal_projector" in n]
        rest = [p for n, p in self.model.named_parameters() if p.requires_grad and "multi_modal_projector" not in n]
        groups = [{"params": projector, "lr_scale": self.projector_lr_scale, "weight_decay": 0.0}]
        return groups + ([{"params": rest}] if rest else [])

    def save_pretrained(self, directory: Path) -> None:
        save_alignment(self.model.vlm, self.peft_model, directory)


def _corpus_sources(config: AlignConfig, corpus_dir: Path):
    """The two stages' dataset sources: the user's, or the synthetic web's two files."""
    from ..data.sources import DatasetSource

    if config.captions:
        return list(config.captions), list(config.instructions)
    make = lambda name, file: DatasetSource(name=name, kind="vlm", format="llava_json", path=corpus_dir / file,  # noqa: E731
                                            image_root=corpus_dir)  # fmt: skip
    return [make("web_captions", "captions.json")], [make("web_vqa", "vqa.json")]


def _train_phase(phase: str, config: AlignConfig, st, vlm, processor, cache, accelerator):
    """Stage 1 (projector only) or stage 2 (projector + LM); returns the TrainResult."""
    import torch

    from ..models.parts import find_parts, lora_targets
    from ..train import train
    from .data import DATA_DIR, EncodedSamples

    settings = config.pretrain if phase == "pretrain" else config.finetune
    samples = EncodedSamples(Path(st.dir) / DATA_DIR / f"{phase}.parquet")
    if len(samples) < settings.batch_size:
        raise StageError(f"{phase}: {len(samples)} usable samples, fewer than {phase}.batch_size={settings.batch_size}")
    torch.manual_seed(settings.seed)
    vlm.requires_grad_(False)
    peft_model = None
    if phase == "finetune":
        parts = find_parts(vlm)
        if config.mode == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout, bias="none",
                              target_modules=lora_targets(vlm, parts, config.lora.targets))  # fmt: skip
            peft_model = get_peft_model(vlm, lora)
        else:
            for name, p in vlm.named_parameters():
                if parts.part_of(name) in ("language_model", "lm_head"):
                    p.requires_grad_(True)
    vlm.model.multi_modal_projector.requires_grad_(True)
    model = AlignedVLM(vlm, peft_model)
    pad = processor.tokenizer.pad_token_id
    task = AlignTask(model, samples, cache, pad if pad is not None else 0,
                     config.projector_lr_scale if phase == "finetune" else 1.0, peft_model)  # fmt: skip
    run = PhaseRun(Path(st.dir) / phase, Path(st.final_dir) / phase, st.log)
    run.dir.mkdir(parents=True, exist_ok=True)
    with st.timed(phase):
        result = train(task, settings, run, accelerator=accelerator)
    save_alignment(vlm, peft_model, run.dir / ALIGNED)
    return result, peft_model


def run_align(config: AlignConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Run ``midtrain align`` into ``<run>/<config.name>``; returns that directory."""
    from ..fit.estimator import torch_threads
    from .assemble import check_parts

    tower, lm = check_parts(config.vision_tower, config.language_model, config.text_layers, config.max_length)
    inputs: dict[str, Path] = {}
    for key, sources in (("captions", config.captions), ("instructions", config.instructions)):
        inputs.update({f"{key}/{d.name}": Path(d.path) for d in sources})
    for key, name in (("vision_tower", config.vision_tower), ("language_model", config.language_model)):
        if Path(name).expanduser().is_dir():
            inputs[key] = Path(name).expanduser()
    with torch_threads(config.num_threads), stage_run(run_dir, config.name, config, inputs, force) as st:
        if st.skipped_as_complete:
            return st.final_dir
        _run(config, st, tower, lm)
    return st.final_dir


def _run(config: AlignConfig, st, tower, lm) -> None:
    from ..models.loading import load_vlm
    from ..sim.web import WEB_KINDS, write_web_corpus
    from ..train import make_accelerator, read_metrics
    from .assemble import assemble_vlm
    from .data import DATA_DIR, FEATURES_DIR, FeatureCache, encode_phase, read_rows, write_phase

    work = Path(st.dir)
    st.extra["parts"] = {"vision_tower": tower.name, "image_tokens": tower.tokens, "tower_width": tower.width,
                         "language_model": lm.name, "text_layers": lm.layers, "lm_width": lm.width}  # fmt: skip
    if not st.shard_done(BASE):
        shutil.rmtree(work / BASE, ignore_errors=True)
        with st.timed("assemble"):
            assemble_vlm(work / BASE, config.vision_tower, config.language_model, config.text_layers, config.seed_projector)
        st.mark_shard_done(BASE)
    if not config.captions and not st.shard_done(CORPUS):
        shutil.rmtree(work / CORPUS, ignore_errors=True)
        with st.timed("corpus"):
            sizes = {kind: config.corpus.size_of(kind) for kind in WEB_KINDS}
            composition = write_web_corpus(work / CORPUS, sizes, config.seed, "train", config.corpus.image_size,
                                           progress=lambda items: st.progress(items, total=len(items), desc="web corpus", unit="kind"))  # fmt: skip
        st.mark_shard_done(CORPUS, composition)
    if not config.captions:
        st.extra["corpus"] = st.shard_info(CORPUS)

    vlm, processor = load_vlm(work / BASE, dtype="float32", device="cpu")
    cache = FeatureCache(work / FEATURES_DIR)
    captions, instructions = _corpus_sources(config, work / CORPUS)
    for phase, sources in zip(PHASES, (captions, instructions)):
        shard = f"data_{phase}"
        if st.shard_done(shard):
            continue
        st.current_shard = shard
        with st.timed(f"encode_{phase}"):
            rows = read_rows(sources, config.seed, st)
            table = encode_phase(rows, processor, vlm, cache, config.max_length, config.feature_batch, st, f"encode {phase}")
            write_phase(table, work / DATA_DIR / f"{phase}.parquet")
        st.mark_shard_done(shard, {"samples": table.num_rows, "rows_read": len(rows)})
        st.current_shard = None
    st.counts.update({f"{p}_samples": st.shard_info(f"data_{p}")["samples"] for p in PHASES})
    st.counts["images_cached"] = len(cache.index)

    accelerator = make_accelerator(config.pretrain.precision, config.device)
    vlm = vlm.to(accelerator.device)
    summaries = {}
    for phase in PHASES:
        if phase == "finetune":
            load_projector(vlm, work / "pretrain" / ALIGNED)  # stage 2 starts from stage 1's projector
        if st.shard_done(phase):
            summaries[phase] = st.shard_info(phase)
            continue
        result, _ = _train_phase(phase, config, st, vlm, processor, cache, accelerator)
        rows = [r for r in read_metrics(work / phase / "metrics.jsonl") if "loss" in r]
        summaries[phase] = {"steps": result.steps, "samples": result.samples, "tokens": result.tokens,
                            "train_seconds": round(result.seconds, 1), "first_loss": rows[0]["loss"] if rows else None,
                            "final_loss": result.train_loss, "resumed_from": result.resumed_from}  # fmt: skip
        st.mark_shard_done(phase, summaries[phase])
    st.extra["training"] = summaries

    final = work / FINAL_MODEL
    shutil.rmtree(final, ignore_errors=True)
    with st.timed("save_model"):
        base, processor = load_vlm(work / BASE, dtype="float32", device="cpu")
        aligned = apply_alignment(base, work / "finetune" / ALIGNED)
        aligned.save_pretrained(final, safe_serialization=True)
        processor.save_pretrained(final)
        shutil.rmtree(work / ALIGNED, ignore_errors=True)
        shutil.copytree(work / "finetune" / ALIGNED, work / ALIGNED)
        info = {"base_model": str(Path(st.final_dir) / BASE), "vision_tower": config.vision_tower,
                "language_model": config.language_model, "text_layers": lm.layers, "mode": config.mode,
                "training": summaries}  # fmt: skip
        (final / "midtrain_align.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    st.extra["final_model"] = str(Path(st.final_dir) / FINAL_MODEL)
    st.extra["aligned_files"] = {p.name: p.stat().st_size for p in sorted((work / ALIGNED).iterdir())}
