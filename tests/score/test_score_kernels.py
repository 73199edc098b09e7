"""The proximity scorer's kernels: ``compiled`` (torch.compile'd fused float16 x float32 dot)
against ``eager`` (float32 copy + torch.mv) and the estimator module itself; the ``auto``
choice; the fallback to ``eager`` when the compile fails.

Only ``test_compiled_kernel_matches_eager_and_the_module`` pays for the compile (~5-14 s);
the compiled kernel is cached for the process, so the stage test after it reuses it.

Tolerances are worst-case float32 rounding bounds, not fitted constants: a length-n dot
product summed in float32 (any order, with or without FMA) is within ``n u sum|terms|``
of the exact value (u = 2^-24, Higham, Accuracy and Stability of Numerical Algorithms,
§3.1), so two kernels that each compute ``x.w' + b'`` (the standardiser folded into
``w'``, ``b'``) differ by at most ``2 (d + 1) u (sum_i |x_i w'_i| + |b'|)``; the module
(standardise, then ``w.z + b``) adds a few roundings per term and the folding rounds
``w'`` and ``b'`` once, so it gets ``(2d + 8) u (...)``. Both bounds are about 1e-5
relative for d = 64, while a kernel that rounded its output to float16 (2^-11 relative)
would fail them.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from run_fixtures import write_features

from midtrain.data.features import open_features
from midtrain.runs import RunDir
from midtrain.score import scorers
from midtrain.fit.estimator import ProximityEstimator, save_estimator
from midtrain.score.config import ScoreConfig
from midtrain.score.stage import score_feature_shard, score_pool
from midtrain.score.scorers import AUTO_COMPILE_MIN_BYTES, ProximityScorer, choose_kernel

U = 2.0**-24
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler: the compiled kernel falls back (tested below)")


def random_estimator(dim: int, kind: str = "linear", seed: int = 0) -> ProximityEstimator:
    torch.manual_seed(seed)
    model = ProximityEstimator(dim, kind=kind, hidden=(8,))
    for lin in (m for m in model.net if isinstance(m, torch.nn.Linear)):
        torch.nn.init.normal_(lin.weight, std=dim**-0.5)
        torch.nn.init.normal_(lin.bias)
    rng = np.random.default_rng(seed)
    model.set_standardiser(rng.normal(0, 0.5, dim), rng.uniform(0.5, 2.0, dim))
    return model.eval()


def dot_scale(model: ProximityEstimator, x16: np.ndarray) -> np.ndarray:
    """Per row: sum |x_i w'_i| + |b'| (folded) + sum |w_i z_i| + |b| (module), in float64."""
    (wf, bf), lin = model.folded_layers()[0], model.net[0]
    x = x16.astype(np.float64)
    z = (x - model.feature_mean.double().numpy()) / model.feature_std.double().numpy()
    w = lin.weight.detach().double().numpy()[0]
    return (np.abs(x) @ np.abs(wf.double().numpy()[0]) + abs(float(bf[0])) + np.abs(z) @ np.abs(w)
            + abs(float(lin.bias.detach()[0])))  # fmt: skip


def score_file(scorer: ProximityScorer, path, n: int, chunk_rows: int | None) -> np.ndarray:
    return score_feature_shard(scorer, path, [str(i) for i in range(n)], chunk_rows)["logit"]


@pytest.mark.slow  # the compile: 13-21 s
@needs_cxx
def test_compiled_kernel_matches_eager_and_the_module(tmp_path):
    d, n = 64, 1000
    model = random_estimator(d)
    x16 = (np.random.default_rng(1).standard_normal((n, d)) * 2 + 0.3).astype(np.float16)
    np.save(tmp_path / "s.npy", x16)
    eager = score_file(ProximityScorer(model, "eager"), tmp_path / "s.npy", n, None)
    with torch.no_grad():
        module = model(torch.from_numpy(x16.astype(np.float32))).numpy()
    scale = dot_scale(model, x16)
    # 300: chunks 300, 300, 300 and a partial 100 (all compiled); 333: 333 x 3 compiled and a
    # 1-row tail that goes eager (torch.compile would re-compile for a size-1 dimension)
    for chunk_rows, compiled_rows in ((300, 1000), (333, 999)):
        scorer = ProximityScorer(model, "compiled")
        got = score_file(scorer, tmp_path / "s.npy", n, chunk_rows)
        info = scorer.describe()
        assert info["kernel"] == "compiled", info
        assert info["kernel_rows"] == {"compiled": compiled_rows, "eager": n - compiled_rows}
        assert got.dtype == np.float32
        assert np.all(np.abs(got.astype(np.float64) - eager) <= 2 * (d + 1) * U * scale)
        assert np.all(np.abs(got.astype(np.float64) - module) <= (2 * d + 8) * U * scale)
        assert not np.array_equal(got, np.float16(got))  # not float16-rounded
    # the default chunk of the compiled kernel is large (per-call overhead amortised)
    assert ProximityScorer(model, "compiled").default_chunk_rows == scorers.COMPILED_CHUNK_ROWS


def small_run(tmp_path, dim: int = 32, kind: str = "linear") -> tuple[RunDir, object]:
    rng = np.random.default_rng(0)
    run = RunDir(tmp_path / "run")
    write_features(run, [("pool", "vlm", rng.standard_normal((250, dim)).astype(np.float32)),
                         ("robot", "vla", rng.standard_normal((50, dim)).astype(np.float32))])  # fmt: skip
    est = save_estimator(random_estimator(dim, kind), tmp_path / "est", {"feature_fingerprint": run.manifest("featurize")["fingerprint"]})
    return run, est


def logits(out) -> np.ndarray:
    return pq.read_table(out / "proximity_scores.parquet").column("logit").to_numpy()


@pytest.mark.slow
@needs_cxx
def test_stage_records_the_compiled_kernel(tmp_path):
    run, est = small_run(tmp_path)
    eager = logits(score_pool(ScoreConfig(estimator=est, kernel="eager"), run))
    man = run.manifest("score")
    assert (man["kernel"], man["kernel_rows"]) == ("eager", {"compiled": 0, "eager": 300})
    # kernel is a throughput setting (same scores), so the finished stage is re-run only when forced
    got = logits(score_pool(ScoreConfig(estimator=est, kernel="compiled"), run, force=True))  # reuses the compiled kernel
    man = run.manifest("score")
    assert man["kernel"] == "compiled" and man["kernel_requested"] == "compiled" and "kernel_fallback" not in man
    assert man["kernel_rows"] == {"compiled": 300, "eager": 0} and man["config"]["kernel"] == "compiled"
    x16 = open_features(run.stage_dir("featurize")).take(np.arange(300)).astype(np.float16)
    np.testing.assert_allclose(got, eager, rtol=0, atol=2 * 33 * U * dot_scale(random_estimator(32), x16).max())


def test_auto_compiles_only_a_large_pool_for_the_linear_estimator(tmp_path):
    assert choose_kernel("auto", "linear", AUTO_COMPILE_MIN_BYTES - 1)[0] == "eager"
    assert choose_kernel("auto", "linear", AUTO_COMPILE_MIN_BYTES)[0] == "compiled"
    assert choose_kernel("auto", "mlp", 10 * AUTO_COMPILE_MIN_BYTES)[0] == "eager"
    assert choose_kernel("compiled", "linear", 1) == ("compiled", "set in the config")
    with pytest.raises(ValueError, match="kernel must be one of"):
        choose_kernel("fast", "linear", 1)
    run, est = small_run(tmp_path)
    score_pool(ScoreConfig(estimator=est), run)  # default kernel: auto
    man = run.manifest("score")
    assert man["config"]["kernel"] == "auto" and man["kernel"] == "eager"
    assert man["kernel_reason"].startswith("auto: 0.00 GiB of features is under 64 GiB")


def test_failed_compile_falls_back_to_eager_logged_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(scorers, "_COMPILED", {})  # a fresh process: nothing compiled yet

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    run, est = small_run(tmp_path)
    eager = logits(score_pool(ScoreConfig(estimator=est, kernel="eager"), run))
    with caplog.at_level(logging.INFO):
        got = logits(score_pool(ScoreConfig(estimator=est, kernel="compiled"), run, force=True))
        again = ProximityScorer(random_estimator(32), "compiled")
        again.logits(np.zeros((20, 32), np.float16))
    man = run.manifest("score")
    assert man["kernel"] == "eager" and man["kernel_requested"] == "compiled"
    assert "No working C++ compiler found" in man["kernel_fallback"] and man["kernel_rows"]["compiled"] == 0
    np.testing.assert_array_equal(got, eager)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "compiled scoring kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "No working C++ compiler found" in warnings[0].getMessage()
    assert again.describe()["kernel"] == "eager"


def test_a_failing_compiled_kernel_and_an_mlp_fall_back_to_eager(monkeypatch, caplog):
    def broken(x, w, b):
        raise RuntimeError("inductor re-compile failed")

    monkeypatch.setattr(scorers, "_COMPILED", {"fn": broken, "seconds": 0.0})
    model = random_estimator(32)
    x16 = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float16)
    scorer = ProximityScorer(model, "compiled")
    with caplog.at_level(logging.WARNING):
        got = scorer.logits(x16)
    np.testing.assert_array_equal(got, ProximityScorer(model, "eager").logits(x16))
    assert scorer.describe()["kernel"] == "eager" and "re-compile failed" in scorer.describe()["kernel_fallback"]
    assert any("compiled scoring kernel failed" in r.getMessage() for r in caplog.records)
    mlp = ProximityScorer(random_estimator(32, "mlp"), "compiled")
    assert mlp.kernel == "eager" and "linear estimator only" in mlp.describe()["kernel_fallback"]
    with torch.no_grad():
        ref = random_estimator(32, "mlp")(torch.from_numpy(x16.astype(np.float32))).numpy()
    np.testing.assert_allclose(mlp.logits(x16), ref, rtol=1e-5, atol=1e-5)  # the eager MLP path, as before
