"""Load and run a checkpoint the way a user without midtrain would: ``AutoModelForImageTextToText`` +
``AutoProcessor`` in a fresh process in which importing midtrain fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
sys.modules["midtrain"] = None  # any import of midtrain raises ImportError in this process
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

path = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(path)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(text=[text], images=[[Image.new("RGB", (64, 64), "red")]], return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    logits = model(**inputs).logits[0, -1]
print(json.dumps({"class": type(model).__name__, "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
                  "text": processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True),
                  "last_logits": logits[:8].tolist(),
                  "midtrain_loaded": any(k.startswith("midtrain") and sys.modules[k] is not None for k in sys.modules)}))
"""


def run_without_midtrain(checkpoint: Path, timeout: float = 600) -> dict:
    """The subprocess's report: model class, generated tokens and text, a few logits, whether midtrain loaded.
    midtrain stays importable on the path; the script makes every import of it fail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(checkpoint))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
