"""``midtrain vla``: VLA policy training (config, data, stage)."""
