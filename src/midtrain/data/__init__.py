"""Sample catalog: the schema, readers (LLaVA/ShareGPT, Parquet/HF, LeRobot) and writers."""
