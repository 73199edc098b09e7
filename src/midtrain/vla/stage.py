"""``midtrain vla``: train a VLA policy (a VLM backbone with an ``mlp``, ``flow`` or ``tokens`` action
head) on robot data, with the shared training loop (:func:`midtrain.train.train`).

Steps, top to bottom:

1. check the backbone (or the policy to continue) and the data source before anything loads;
2. read the robot data (catalog VLA sources, or a LeRobot dataset read natively), check every
   frame and episode (:mod:`midtrain.vla.data`), hold out whole episodes for validation;
3. normalisation statistics from the training frames (every valid step of every chunk), the
   policy config, the policy (:meth:`midtrain.policy.VLAPolicy.build`) and its trainable parts;
   with ``backbone.trainable: frozen`` the backbone runs once per sample here and training
   reads those features (:class:`FrozenFeatures`);
4. :func:`~midtrain.train.train`: same optimiser, schedule, accumulation, accelerate, checkpoint
   and SIGKILL-resume semantics as ``midtrain sft``; held-out loss plus offline metrics (L1 per
   action dimension on the normalised scale, gripper accuracy) every ``train.eval_every`` steps,
   and with ``closed_loop_every`` the closed-loop success rate (``midtrain eval``'s protocol); with
   ``cotrain`` (ETC / VQA co-training, :mod:`midtrain.vla.cotrain`) a VQA micro-batch beside every
   action micro-batch, accumulated into the same optimizer step (``loss_vqa``, ``eval_loss_vqa``);
5. the final policy in ``<run>/<name>/policy/`` (``VLAPolicy.from_pretrained`` loads it; every
   ``checkpoints/step-NNNNNN/`` is a loadable policy directory too), ``metrics.jsonl``, and the
   manifest (data counts, held-out episodes, parameters, final metrics).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..models.loading import check_vlm
from ..runs import RunDir, StageError
from ..train.plots import closed_loop_rows, plot_closed_loop, plot_loss_curves
from .config import VLAConfig
from .data import (RobotData, check_rows, image_size_of, lerobot_meta, read_catalog, read_lerobot, split_by_episode,
                   training_frames_record)

FINAL_POLICY = "policy"


# --------------------------------------------------------------------------- the training task


class FrozenFeatures:
    """A frozen backbone's output for every sample, computed once (``policy.backbone_features``),
    with the sample's targets: what the head trains on for every epoch."""

    def __init__(self, policy, rows: list[dict], batch_size: int, progress=None):
        import torch

        self.items: list[dict] = []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                part = rows[start : start + batch_size]
                batch = policy.io.collate(part)
                feats = policy.backbone_features(batch["inputs"], batch["state"])
                for i, row in enumerate(part):
                    self.items.append({
                        "features": feats[i].detach().cpu(), "action": batch["action"][i], "action_mask": batch["action_mask"][i],
                        "state": None if batch["state"] is None else batch["state"][i], "id": str(row["id"]),
                    })  # fmt: skip
                if progress is not None:
                    progress.update(len(part))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class VLATask:
    """The :class:`midtrain.train.TrainTask` of policy training (see the stage docstring)."""

    def __init__(self, policy, train_data, eval_data, frozen: bool, seed: int):
        self.model = policy
        self.train_dataset = train_data
        self.eval_dataset = eval_data
        self.frozen = frozen
        self.seed = seed
        self.find_unused_parameters = False
        self.training_frames: dict | None = None  # how the training frames were made (training_frames.json)
        self.fsdp_forward_methods = ("metrics",)  # evaluate() calls it on the model: FSDP gathers weights for it

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        import torch

        if self.frozen:
            batch = {
                "features": [s["features"] for s in samples], "action": torch.stack([s["action"] for s in samples]),
                "action_mask": torch.stack([s["action_mask"] for s in samples]),
                "state": None if samples[0]["state"] is None else torch.stack([s["state"] for s in samples]),
                "sample_ids": [s["id"] for s in samples],
            }  # fmt: skip
        else:
            batch = self.model.io.collate(samples)
            batch["num_tokens"] = int(batch["inputs"]["attention_mask"].sum())
        batch["loss_weight"] = int(batch["action_mask"].sum())  # losses average over valid chunk steps
        return batch

    def save_pretrained(self, directory: Path) -> None:
        if self.training_frames is not None:  # before the policy's config.json, which marks it complete
            from ..eval.codec import TRAINING_FRAMES_FILE
            from ..runs import write_json_atomic

            write_json_atomic(Path(directory) / TRAINING_FRAMES_FILE, self.training_frames)
        self.model.save_pretrained(directory)

    def evaluate(self, model, batches: list[dict]) -> dict[str, float]:
        """Held-out offline metrics: mean absolute error per continuous action dimension on the
        normalised scale (``l1_<name>``, and their mean ``l1``), accuracy of the binarised
        gripper dimensions (``gripper_accuracy``). Flow noise is seeded, so evaluations compare."""
        import torch

        sums: dict[str, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(self.seed)
        cfg = model.config
        for batch in batches:
            noise = torch.randn(len(batch["sample_ids"]), cfg.chunk_size, cfg.action_dim, generator=gen)
            for k, v in model.metrics(batch, noise).items():
                sums[k] = sums.get(k, 0) + v.cpu()
        if not sums:
            return {}
        count = sums["count"].clamp_min(1)
        binary = model.binary.cpu()
        names = cfg.action_names or [f"dim{i}" for i in range(cfg.action_dim)]
        out = {f"l1_{names[d]}": float(sums["abs_error"][d] / count[d]) for d in range(cfg.action_dim) if not binary[d]}
        if out:
            out["l1"] = float(np.mean(list(out.values())))
        if bool(binary.any()):
            out["gripper_accuracy"] = float(sums["correct"][binary].sum() / count[binary].sum())
        return out


def closed_loop_callback(settings, st, every: int):
    """A training-loop callback that runs the policy in closed loop (:func:`midtrain.eval.api.evaluate_policy`)
    into ``<stage>/closed_loop/step-NNNNNN/`` and logs the mean and per-task success rates."""
    from ..eval.api import evaluate_policy
    from ..train import Callback

    def run(ctx) -> dict | None:
        if not ctx.accelerator.is_main_process:
            return None
        out = Path(st.dir) / "closed_loop" / f"step-{ctx.step:06d}"
        results = evaluate_policy(ctx.model, settings, out, log=st.log)
        return {"success": results["mean_success"], **{f"success_{t}": v["success_rate"] for t, v in results["tasks"].items()}}

    return Callback(every, run, "closed_loop")


# --------------------------------------------------------------------------- data


def _data_input(config: VLAConfig, run_dir: RunDir) -> tuple[str, Path]:
    if config.data.lerobot is not None:
        path = Path(config.data.lerobot).expanduser()
        if not (path / "meta" / "info.json").is_file():
            raise StageError(f"data.lerobot: {path} is not a LeRobot dataset (meta/info.json is missing)")
        return "lerobot", path
    catalog = Path(config.data.catalog) if config.data.catalog else run_dir.require("catalog")
    if not catalog.is_dir():
        raise StageError(f"data.catalog: {catalog} is not a directory; point it at a catalog stage output")
    return "catalog", catalog


def load_robot_data(config: VLAConfig, kind: str, path: Path, st, expected=None) -> RobotData:
    """Read and check the robot data. ``expected`` (a continued policy's config) fixes the chunking,
    dimensions and cameras; its mismatches with the data's metadata stop the stage before any
    frame is read."""
    d = config.data
    p = expected.settings if expected is not None else config.policy
    cameras = d.cameras if d.cameras is not None else (expected.camera_keys if expected is not None else None)
    name = str(path)
    since = f"the policy checkpoint {config.init_policy}" if expected is not None else "the dataset's metadata"
    if kind == "lerobot":
        meta = lerobot_meta(path, cameras)
        if expected is not None and meta.action_dim is not None and meta.action_dim != expected.action_dim:
            raise StageError(f"{name}: {meta.action_dim}-D actions, but {since} predicts {expected.action_dim}-D actions")
        rows, meta = read_lerobot(path, p.chunk_size, cameras, d.episodes, d.frame_stride, config.seed, st.handle)
        metas = {"": meta}
    else:
        rows, metas = read_catalog(path, d.sources, cameras)
    used = {r.get("source") for r in rows}
    meta_list = [m for s, m in metas.items() if s in used or s == ""]
    camera_sets = {tuple(m.cameras) for m in meta_list}
    if cameras is not None:
        camera_keys = list(cameras)
    elif len(camera_sets) == 1 and next(iter(camera_sets)):
        camera_keys = list(next(iter(camera_sets)))
    elif len(camera_sets) > 1:
        raise StageError(f"{name}: the sources have different cameras {sorted(camera_sets)}; set data.cameras")
    else:
        camera_keys = [f"observation.images.camera{i}" for i in range(len(rows[0]["image_refs"]) if rows else 0)]
    meta0 = meta_list[0] if meta_list else None
    a_dim = expected.action_dim if expected is not None else (meta0.action_dim if meta0 else None)
    s_dim = expected.state_dim if expected is not None else (None if p.use_state else 0)
    min_len = d.min_episode_length or p.chunk_size
    kept, counts = check_rows(rows, name, p.chunk_size, min_len, a_dim, s_dim, st.handle, since)
    if counts["state_dim"] == 0 or not p.use_state:
        for r in kept:
            r["state"] = None
        counts["state_dim"] = 0
    n_images = {len(r["image_refs"]) for r in kept}
    if n_images != {len(camera_keys)}:
        raise StageError(f"{name}: rows have {sorted(n_images)} images but the cameras are {camera_keys}")
    action_names = (meta0.action_names if meta0 else []) or []
    state_names = (meta0.state_names if meta0 else []) or []
    return RobotData(
        name=name, rows=kept, action_dim=counts["action_dim"], state_dim=counts["state_dim"], camera_keys=camera_keys,
        image_size=image_size_of(kept[0]),
        action_names=action_names if len(action_names) == counts["action_dim"] else [],
        state_names=state_names if len(state_names) == counts["state_dim"] else [], counts=counts,
    )  # fmt: skip


def normalization_stats(rows: list[dict], chunk_size: int, state_dim: int) -> dict[str, dict]:
    """Statistics of every valid action step of the training chunks, and of the training states."""
    from ..policy.normalize import compute_stats

    steps = [np.asarray(r["action"], dtype=np.float64)[:chunk_size][np.asarray(r["action_mask"][:chunk_size], dtype=bool)]
             for r in rows]  # fmt: skip
    stats = {"action": compute_stats(np.concatenate(steps))}
    if state_dim:
        stats["state"] = compute_stats(np.asarray([r["state"] for r in rows], dtype=np.float64))
    return stats


# --------------------------------------------------------------------------- the stage


def _fingerprint_inputs(config: VLAConfig, kind: str, path: Path, cotrain=None) -> dict[str, Path]:
    inputs = {kind: path, **(cotrain.fingerprint_inputs() if cotrain is not None else {})}
    model = Path(config.model).expanduser() if config.model else None
    if model is not None and model.is_dir():
        inputs["model"] = model
    if config.init_policy is not None:
        inputs["init_policy"] = Path(config.init_policy)
    return inputs


def train_vla(config: VLAConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Run ``midtrain vla`` into ``<run>/<config.name>``; returns that directory."""
    from ..policy.configuration import PolicyConfig, resolve_gripper_dims
    from ..train import distributed_stage, make_accelerator, read_metrics, train
    from ..train.fsdp import check_fsdp

    expected = None
    if config.init_policy is not None:
        expected = PolicyConfig.load(Path(config.init_policy))  # fail fast: a policy checkpoint
    else:
        check_vlm(config.model, config.backbone.trust_remote_code)  # fail fast: exists, is a VLM
    kind, path = _data_input(config, run_dir)
    from .cotrain import build_stream, prepare, resolve_inputs

    cotrain = resolve_inputs(config.cotrain, run_dir)  # fail fast: the ETC stages and domains exist
    # a VQA batch leaves the action head without gradient (and an action batch an untied LM head)
    accelerator = make_accelerator(config.train.precision, config.device, find_unused_parameters=cotrain is not None)
    check_fsdp(accelerator, config.train, config.model or Path(config.init_policy) / expected.backbone,
               config.backbone.trust_remote_code, closed_loop=bool(config.closed_loop_every))  # train.fsdp (train/fsdp.py)
    with distributed_stage(accelerator, run_dir, config.name, config, _fingerprint_inputs(config, kind, path, cotrain),
                           force) as st:  # fmt: skip
        if st.skipped_as_complete:
            return st.final_dir
        import torch

        from ..policy import VLAPolicy

        main = accelerator.is_main_process
        # -- data -------------------------------------------------------------------------------
        with st.timed("load_data"):
            data = load_robot_data(config, kind, path, st, expected)
        train_rows, val_rows, held_out = split_by_episode(data.rows, config.data.val_fraction, config.seed)
        if main:
            st.counts.update({**data.counts, "train_frames": len(train_rows), "val_frames": len(val_rows)})
            st.extra["data"] = {"source": str(path), "kind": kind, "camera_keys": data.camera_keys,
                                "image_size": data.image_size, "held_out_episodes": held_out}  # fmt: skip
            st.log.info("%s: %d frames (%d train, %d held out in %d episodes)", data.name, len(data.rows),
                        len(train_rows), len(val_rows), len(held_out))  # fmt: skip

        # -- policy -----------------------------------------------------------------------------
        torch.manual_seed(config.train.seed)  # head and LoRA initialisation are part of the run's seed
        device = str(accelerator.device)
        with st.timed("load_model"):
            if expected is not None:
                policy = VLAPolicy.from_pretrained(config.init_policy, device=device, dtype=config.backbone.dtype)
            else:
                pcfg = PolicyConfig(
                    settings=config.policy, action_dim=data.action_dim, action_names=data.action_names,
                    state_dim=data.state_dim, state_names=data.state_names, camera_keys=data.camera_keys,
                    image_size=data.image_size,
                    gripper_dims=resolve_gripper_dims(config.policy, data.action_names, data.action_dim),
                    normalization_stats=normalization_stats(train_rows, config.policy.chunk_size, data.state_dim),
                )  # fmt: skip
                policy = VLAPolicy.build(pcfg, config.model, config.backbone.dtype, device,
                                         config.backbone.attn_implementation, config.backbone.trust_remote_code,
                                         seed=config.train.seed)  # fmt: skip
        b = config.backbone
        counts = policy.configure_trainable(b.trainable, b.vision, b.lora)
        if main:
            st.extra["parameters"] = counts
            st.extra["policy_config"] = policy.config.to_dict()
            st.log.info("trainable parameters: %s", counts)
        frozen = b.trainable == "frozen"
        if frozen:
            with st.timed("backbone_features"), st.progress(total=len(train_rows) + len(val_rows), desc="features", unit="frame") as bar:
                train_data = FrozenFeatures(policy, train_rows, config.feature_batch_size, bar)
                val_data = FrozenFeatures(policy, val_rows, config.feature_batch_size, bar) if val_rows else None
            st.counts["backbone_passes"] = len(train_rows) + len(val_rows)
        else:
            train_data, val_data = train_rows, (val_rows or None)
        task = VLATask(policy, train_data, val_data, frozen, config.seed)
        task.training_frames = training_frames_record(kind, path, policy.config.camera_keys, list(policy.config.image_size),
                                                      {r.get("source") for r in data.rows})  # fmt: skip
        streams = []
        if cotrain is not None:
            from ..policy.backbone import is_bidirectional

            if is_bidirectional(policy.backbone.vlm):
                raise StageError(f"cotrain: {config.model or config.init_policy}'s language model attends both ways, so "
                                 "next-token VQA targets would be visible; co-train a causal VLM")  # fmt: skip
            processor = policy.backbone.processor
            composition = prepare(cotrain, config.cotrain, processor, st.dir, config.seed, st, main, accelerator)
            stream, info = build_stream(cotrain, config.cotrain, st.dir, config.train.batch_size, config.train.seed, processor)
            streams.append(stream)
            if main:
                st.extra["cotrain"] = {**info, "composition": composition}
                st.counts["cotrain_train_samples"] = len(stream.dataset)
                st.log.info("co-training: %d VQA samples per action micro-batch of %d, from %s", info["micro_batch"],
                            config.train.batch_size, {n: round(v["weight"], 3) for n, v in info["sources"].items()})  # fmt: skip

        # -- train ------------------------------------------------------------------------------
        callbacks = []
        if config.closed_loop_every:
            cl = config.closed_loop
            corpora = [s["path"] for s in task.training_frames["sources"] if s["video"]]
            if cl.corpus is None and corpora:  # observations as the training frames were recorded
                cl = dataclasses.replace(cl, corpus=Path(corpora[0]))
            callbacks.append(closed_loop_callback(cl, st, config.closed_loop_every))
        with st.timed("train"):
            result = train(task, config.train, st, accelerator=accelerator, callbacks=callbacks, streams=streams)

        # -- the final policy -------------------------------------------------------------------
        if main:
            final = Path(st.dir) / FINAL_POLICY
            if final.exists():
                shutil.rmtree(final)
            with st.timed("save_policy"):
                last = Path(st.dir) / "checkpoints" / result.final_checkpoint.name  # where it is until the swap
                shutil.copytree(last, final, ignore=shutil.ignore_patterns("trainer_state"))
            rows = read_metrics(Path(st.dir) / "metrics.jsonl")
            title = f"{config.name}: {config.policy.head} head, backbone {config.backbone.trainable}"
            plot_loss_curves(rows, Path(st.dir) / "loss_curves.png", title, loss_label=f"train ({config.policy.head} head)")
            if closed_loop_rows(rows):
                plot_closed_loop(rows, Path(st.dir) / "closed_loop.png", title)
            seconds = max(result.seconds, 1e-9)
            st.extra["train"] = {
                "steps": result.steps, "resumed_from": result.resumed_from, "processes": result.processes,
                "global_batch": result.global_batch, "train_loss": result.train_loss, **result.eval,
                "samples": result.samples, "train_seconds": round(result.seconds, 2),
                "samples_per_s": round(result.samples / seconds, 2), "final_checkpoint": result.final_checkpoint.name,
                "metrics_rows": len(rows),
                "fsdp": config.train.fsdp and result.processes > 1, "state_bytes_per_process": result.state_bytes,
            }  # fmt: skip
            st.extra["final_policy"] = str(Path(st.final_dir) / FINAL_POLICY)
            st.log.info("vla done: %d steps, train loss %s, %s", result.steps, result.train_loss, result.eval)
    return st.final_dir
