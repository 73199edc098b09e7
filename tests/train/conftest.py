from torch_threads import one_thread  # noqa: F401  (autouse: one intra-op thread)
