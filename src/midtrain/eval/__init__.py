"""Closed-loop evaluation of a policy in simulation (``midtrain eval``).

- ``config``: :class:`EvalSettings` (the protocol: benchmark, tasks, episodes, step limit, frames)
  and :class:`EvalConfig` (the stage: the settings plus a policy checkpoint directory).
- ``api``: :func:`evaluate_policy` - what the stage, the VLA training loop and the study call.
- ``policies``: the policy contract, the checkpoint loader and the scripted baselines.
- ``simulators``: Meta-World v3 and LIBERO behind one episode interface.
- ``rollout``: one episode, and episodes in spawned worker processes.
- ``codec``: the corpus's video codec round trip for observation frames.
- ``results``: Wilson intervals, ``episodes.parquet`` and ``results.json``.
- ``video``: episode MP4s.
- ``html``: the report section (table and videos) and its headless-browser check.

Nothing is imported here, so ``midtrain eval --help`` stays fast.
"""
