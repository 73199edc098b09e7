"""``midtrain sft``: supervised fine-tuning (mid-training) of any Hugging Face VLM on the selected mixture.

- :class:`SFTConfig` (``config``): the stage config (model, full/LoRA, vision tower, data, mixture, ``train:``);
- :func:`run_sft` (``stage``): the recipe, top to bottom;
- ``data``: inputs, the seeded fixed-budget draw, lengths, label masks;
- ``model``: what trains, the answer-token loss, saving and merging;
- ``plots``: the loss curves and the drawn composition.
"""
