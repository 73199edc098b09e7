"""The VLMs a study starts from: the study VLM (given, or built) and the same architecture with
random weights (the train-from-scratch row, as ``rethinking-vla-initialization.txt`` reports).

Both are stages of the run directory (``vlm/``, ``vlm_random/``) writing an ordinary checkpoint to
``model/``, loadable with :func:`midtrain.models.load_vlm`; a rerun finds them complete.

Random weights: the checkpoint's own config, every module initialised by its architecture's
``_init_weights`` (``from_config``) under a seed derived from the study seed and the words
"random weights" (a VLM that is itself random - a tiny test model built with the study seed -
must not come out identical), the base checkpoint's
processor (tokenizer, chat template, image processor) unchanged - the same architecture,
input pipeline and vocabulary, nothing learned.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ...config import StageConfig, option
from ...runs import RunDir, StageError, stage_run
from ...seeding import key_word

MODEL_DIR = "model"


@dataclass
class BuildVLMConfig(StageConfig):
    """What a ``vlm`` / ``vlm_random`` stage builds (its fingerprint)."""

    build: Literal["causal_demo", "tiny", "random_weights"] = option("causal_demo", "what is built")
    text_layers: int = option(2, "causal_demo: SmolLM2 decoder layers kept")
    tiny_arch: str = option("qwen2_vl", "tiny: architecture")
    tiny_size: str = option("test", "tiny: size preset")
    source: str = option("", "random_weights: the checkpoint whose architecture and processor are copied")


def build_vlm_stage(config: BuildVLMConfig, run_dir: RunDir, name: str, force: bool = False) -> Path:
    """Build the model ``config`` describes into ``<run>/<name>/model``; returns that directory."""
    inputs = {"source": Path(config.source)} if config.source and Path(config.source).is_dir() else {}
    with stage_run(run_dir, name, config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.final_dir / MODEL_DIR
        out = Path(st.dir) / MODEL_DIR
        if out.exists():
            shutil.rmtree(out)
        with st.timed("build"):
            if config.build == "causal_demo":
                try:
                    from ...models.causal_demo_vlm import build_causal_demo_vlm
                except ImportError as exc:
                    raise StageError(f"vlm.build: causal_demo needs midtrain.models.causal_demo_vlm ({exc}); "
                                     "or give vlm.model (a VLM checkpoint)") from None  # fmt: skip
                build_causal_demo_vlm(out, seed=config.seed, text_layers=config.text_layers)
            elif config.build == "tiny":
                from ...models.tiny import build_tiny_vlm

                build_tiny_vlm(config.tiny_arch, out, size=config.tiny_size, seed=config.seed)
            else:
                st.extra["parameters"] = save_random_weights(config.source, out, config.seed)
        st.extra["model"] = str(st.final_dir / MODEL_DIR)
        st.log.info("built %s into %s", config.build, out)
    return st.final_dir / MODEL_DIR


def save_random_weights(source: str | Path, out_dir: Path, seed: int) -> int:
    """Save ``source``'s architecture with freshly initialised weights (and its processor) to ``out_dir``;
    returns the parameter count."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ...models.loading import check_vlm, load_processor

    config = check_vlm(str(source))
    processor = load_processor(str(source))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key_word(f"random weights {seed}", hash="blake2b") % 2**63)
        model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
