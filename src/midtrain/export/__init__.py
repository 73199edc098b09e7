"""The export stage: the selected mixture written as LLaVA/ShareGPT JSON (LLaMA-Factory) and Parquet."""
