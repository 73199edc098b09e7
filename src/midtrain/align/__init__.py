"""``midtrain align``: LLaVA's two alignment stages for a VLM assembled from a pretrained vision
tower and a pretrained causal language model (see :mod:`midtrain.align.stage`)."""
