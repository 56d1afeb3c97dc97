"""scripts/bench_deformable_vs_torch.py at its smallest (`--tiny`: toy shapes, one repetition):
every case runs on both sides and reports finite times and ratios, so that the benchmark
cannot break unseen."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402

SCRIPT = REPO / "scripts" / "bench_deformable_vs_torch.py"


def test_tiny_benchmark_reports_every_case_with_finite_times_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], capture_output=True,
                            text=True, timeout=1200, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from bench_deformable_vs_torch import CASES
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert report["tiny"] and report["cpu"] and report["versions"]["torch"]
    results = {r["case"]: r for r in report["results"]}
    assert sorted(results) == sorted(CASES)
    for name, res in results.items():
        assert res["errors"] == {}, (name, res["errors"])
        expected = {"detr-jax", "hf-torch"} | ({"hf-torch-compile"} if res["kind"] == "op" else set())
        assert set(res["frameworks"]) == expected, name
        for framework, stats in res["frameworks"].items():
            assert len(stats["times_s"]) == 1 and all(math.isfinite(t) and t > 0 for t in stats["times_s"])
            assert math.isfinite(stats["median_s"]) and stats["median_s"] > 0
            if framework != "detr-jax":
                assert math.isfinite(stats["peer_over_ours"]) and stats["peer_over_ours"] > 0
        assert res["fastest_ours"] == "detr-jax"
        assert math.isfinite(res["hf_eager_over_fastest_ours"]) and res["hf_eager_over_fastest_ours"] > 0
        if res["kind"] == "op":
            assert math.isfinite(res["torch_compile_over_fastest_ours"])
    assert "op_encoder_fwd" in result.stdout and "HF eager / it" in result.stdout
