"""``hisam bench gpu --quick --device cpu`` (scripts/gpu_check.sh's module): every step reports a status.

The GPU run itself happens on a machine with a GPU; here the same code paths run at tiny
sizes, so a step that would crash on the GPU machine for a reason of its own (an import,
a renamed function, a key) crashes here first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from hisam.bench import gpu


def quick_args(out: Path, **changes) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(["--quick", "--device", "cpu", "--out", str(out)])
    return argparse.Namespace(**{**vars(args), **changes})


def test_quick_run_reports_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(quick_args(tmp_path)) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = result["steps"]
    assert list(steps) == [name for name, *_ in gpu.STEPS]
    for name, record in steps.items():
        assert record["status"] in ("ok", "skipped"), (name, record)
        assert isinstance(record["seconds"], float)
        assert record["status"] == "ok" or record["reason"], name
    assert steps["export"]["status"] == "skipped" and "--quick" in steps["export"]["reason"]
    assert steps["gpu_tests"]["status"] == "skipped" and "CUDA" in steps["gpu_tests"]["reason"]
    for name in ("env", "tokenizer", "ranker_train", "bench_ranker", "eval"):
        assert steps[name]["status"] == "ok", name
    assert steps["eval"]["figures"]["fp32"]["eval_max_abs_diff"] < 1e-5
    assert {"eval_rows_per_s", "eval_speedup"} <= set(steps["bench_ranker"]["figures"])
    train = steps["ranker_train"]["figures"]
    for path in ("flat", "hmat_sdpa", "hmat_structured"):  # FlexAttention runs on CUDA only
        assert train[f"{path}_sft"]["tokens_per_s"] > 0, path
    assert "hmat_flex_sft" not in train and max(train["parity_fp32"][p] for p in ("sdpa", "structured")) < 1e-4
    printed = capsys.readouterr().out
    assert all(name in printed for name in steps) and "gpu_check.json" in printed


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path: Path, monkeypatch) -> None:
    def broken(ctx):
        raise RuntimeError("boom")

    def slow(ctx):
        ctx.partial["measured"] = 1.0
        time.sleep(5)
        return {}

    steps = [
        ("env", gpu.step_env, (), 20),
        ("broken", broken, (), 20),
        ("slow", slow, (), 0.2),
        ("absent", broken, ("no_such_module_here",), 20),
    ]
    monkeypatch.setattr(gpu, "STEPS", steps)
    assert gpu.main(quick_args(tmp_path)) == 1
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps["env"]["status"] == "ok"
    assert steps["broken"]["status"] == "failed" and "boom" in steps["broken"]["error"]
    assert steps["slow"]["status"] == "timeout" and steps["slow"]["seconds"] < 2
    assert steps["slow"]["figures"] == {"measured": 1.0}  # what it measured before the budget ran out
    assert steps["absent"]["status"] == "skipped" and "no_such_module_here" in steps["absent"]["reason"]


def test_an_imported_module_without_a_spec_is_importable() -> None:
    import faust  # faust's lazy module object has no __spec__, so find_spec alone raises ValueError

    from hisam.bench.gpu.runner import importable

    assert faust.__spec__ is None
    assert importable("faust")
    assert not importable("no_such_package_hisam.sub")
