"""Ship a finished alignment as a few MB: the projector and LoRA adapter of ``<run>/align/aligned`` in float16,
with a manifest (the stage's config, the corpus hash, package versions, training summary, the rebuild command).

    python -m midtrain.align.ship runs/align/align src/midtrain/models/aligned/demo_smollm2 [--benchmark result.json]

This is how :data:`midtrain.models.causal_demo_vlm.ALIGNED_DEMO` was made; ``--benchmark`` adds the
final JSON line of ``benchmarks/align.py`` on it to the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

REBUILD = ("midtrain align --config configs/align.yaml --run-dir runs/align && "
           "python -m midtrain.align.ship runs/align/align src/midtrain/models/aligned/demo_smollm2")  # fmt: skip


def corpus_hash(corpus: Path) -> str:
    """sha256 over the corpus's two LLaVA files and every picture, in name order."""
    h = hashlib.sha256()
    for path in [corpus / "captions.json", corpus / "vqa.json", *sorted((corpus / "images").iterdir())]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def ship_alignment(stage_dir: Path, out_dir: Path, benchmark: dict | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    manifest = json.loads((stage_dir / "manifest.json").read_text())
    if manifest.get("status") != "complete":
        raise SystemExit(f"{stage_dir}: the align stage is not complete")
    source = stage_dir / "aligned"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.suffix == ".safetensors":  # float16: half the bytes; the merged weights move by < 1e-3 relative
            save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(path)).items()}, str(out_dir / path.name))
        elif path.is_file() and path.suffix == ".json":  # peft's adapter_config.json (not its README model card)
            shutil.copyfile(path, out_dir / path.name)
    info = {
        "what": f"midtrain align's projector + LoRA adapter for the causal demo VLM (EfficientNet-Lite0 + SmolLM2-135M-"
                f"Instruct, its first {(manifest.get('config') or {}).get('text_layers') or 30} layers, seed 0), float16; "
                "apply with build_causal_demo_vlm(..., alignment=ALIGNED_DEMO)",
        "rebuild": REBUILD,
        "config": manifest.get("config"),
        "fingerprint": manifest.get("fingerprint"),
        "corpus_sha256": corpus_hash(stage_dir / "corpus") if (stage_dir / "corpus").is_dir() else None,
        "corpus": manifest.get("corpus"),
        "training": manifest.get("training"),
        "counts": manifest.get("counts"),
        "versions": manifest.get("versions") or manifest.get("package_versions"),
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
    }  # fmt: skip
    if benchmark is not None:
        info["benchmark"] = benchmark
    (out_dir / "manifest.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--benchmark", type=Path, help="a file whose last line is benchmarks/align.py's JSON result")
    args = ap.parse_args()
    bench = json.loads(args.benchmark.read_text().strip().splitlines()[-1]) if args.benchmark else None
    print(ship_alignment(args.stage_dir, args.out_dir, bench))


if __name__ == "__main__":
    main()
