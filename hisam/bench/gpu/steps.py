"""The GPU check's steps (``hisam bench gpu``): each takes the run's ``Context``, returns its figures."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hisam.bench.gpu.runner import Context, Skip, importable, sync

log = logging.getLogger(__name__)

ATTENTION_PATHS = ("sdpa", "structured", "flex")  # HMAT's exact whole-stream paths; flex last (it compiles)
OPTIONAL = (
    "onnx",
    "onnxruntime",
    "onnxscript",
    "google.protobuf",
    "grpc",
    "grpc_tools",
    "mmh3",
    "feast",
    "faust",
    "aiokafka",
    "tritonclient",
    "sentence_transformers",
    "safetensors",
    "prometheus_client",
    "pandas",
    "tqdm",
)


def step_env(ctx: Context) -> dict:
    found = {m: importable(m) for m in OPTIONAL}
    figures: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(ctx.device),
        "cpus": os.cpu_count(),
        "importable": found,
    }
    name = "cpu"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        name = props.name
        figures |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.is_bf16_supported(),
        }
    if found["onnxruntime"]:
        import onnxruntime as ort

        figures["onnxruntime"] = ort.__version__
        figures["ort_providers"] = ort.get_available_providers()
    missing = [m for m, ok in found.items() if not ok]
    figures["headline"] = f"torch {torch.__version__} on {name}; missing: {', '.join(missing) or 'none'}"
    return figures


def step_tokenizer(ctx: Context) -> dict:
    import numpy as np

    from models.tokenizer.artifact import build_model
    from models.tokenizer.quantize import kmeans
    from recipes.tokenizer.testing import synthetic_items, tiny_config
    from recipes.tokenizer.train import TrainConfig, encode_all, train_tokenizer

    s, device = ctx.sizes, ctx.device
    # The crash this step guards against: k-means++ on device data with a CPU generator.
    x = torch.randn(512, 8, device=device)
    kmeans(x, 16, generator=torch.Generator().manual_seed(0))
    feats, present, _ = synthetic_items(s.tokenizer_items, seed=0)
    model = build_model("dst", tiny_config("dst"))
    batch = 256
    cfg = TrainConfig(
        epochs=s.tokenizer_epochs,
        batch_size=batch,
        seed=0,
        device=str(device),
        progress=False,
        warmup_steps=5,
        refit=not ctx.quick,
        refit_epochs=2,
    )
    t0 = time.perf_counter()
    history = train_tokenizer(model, feats, present, cfg)
    sync(device)
    seconds = time.perf_counter() - t0
    codes, _ = encode_all(model, feats, present)
    steps = s.tokenizer_epochs * math.ceil(s.tokenizer_items / batch)
    distinct = len(np.unique(codes, axis=0)) / len(codes)
    return {
        "kind": "dst",
        "items": s.tokenizer_items,
        "epochs": s.tokenizer_epochs,
        "train_s": seconds,
        "steps_per_s": steps / seconds,
        "final_loss": history[s.tokenizer_epochs - 1]["loss"],
        "distinct_ids": distinct,
        "kmeans_cpu_generator_on_device": "ok",
        "headline": f"{steps} steps in {seconds:.1f} s, {distinct:.0%} distinct IDs",
    }


def _ranker_config(ctx: Context, **changes):
    from recipes.ranker.inputs import PRESETS

    return dataclasses.replace(PRESETS[ctx.sizes.preset](), max_items=ctx.sizes.history, **changes)


def attention_paths(device: torch.device) -> tuple[str, ...]:
    """HMAT's exact whole-stream attention paths that run on ``device`` (FlexAttention: CUDA only)."""
    return tuple(p for p in ATTENTION_PATHS if p != "flex" or device.type == "cuda")


def _attention_parity(ctx: Context) -> dict:
    """fp32 max |path - reference| of the whole-stream attention paths at the preset's real length."""
    from models.hmat import HMAT, UserSequence, build_stream

    cfg = _ranker_config(ctx)
    g = torch.Generator().manual_seed(1)
    users = [
        UserSequence([1, 2], torch.randint(cfg.codebook_size, (t, cfg.n_sid), generator=g),
                     torch.randint(2, (t,), generator=g), torch.randint(cfg.codebook_size, (8, cfg.n_sid), generator=g))
        for t in (ctx.sizes.history, ctx.sizes.history // 2, 1)
    ]  # fmt: skip
    torch.manual_seed(0)
    model = HMAT(cfg).to(ctx.device).eval()
    with torch.no_grad():  # weights at a scale where attention patterns matter
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        stream = build_stream(users, cfg.layout).to(ctx.device)
        want = model.forward_stream(stream, attn_impl="reference")[stream.valid]
        diffs = {}
        for impl in attention_paths(ctx.device):
            got = model.forward_stream(stream, attn_impl=impl)[stream.valid]
            diffs[impl] = float((got - want).abs().max())
    return {"scale": float(want.abs().max()), **diffs}


def step_ranker_train(ctx: Context) -> dict:
    """PT and SFT steps of the flat transformer and of HMAT on each whole-stream attention path.

    The paths are exact (fp32 parity against the reference first); which is fastest on a GPU is
    what this step measures (``resolve_attn_impl`` takes SDPA under the dense mask on CUDA until
    then). FlexAttention goes last: its first step compiles, and a compile that runs past the
    budget then loses no other path's figures.
    """
    from models.device import autocast, resolve_precision
    from models.hmat import HMAT, UserSequence, build_stream, pt_loss, sft_loss
    from models.hmat.baselines import variant_config

    s, device = ctx.sizes, ctx.device
    base = _ranker_config(ctx)
    amp = resolve_precision("auto", device)
    g = torch.Generator().manual_seed(0)
    T, k = s.history, base.n_sid
    users = [
        UserSequence(
            [1, 2, 3], torch.randint(base.codebook_size, (T, k), generator=g), torch.randint(2, (T,), generator=g)
        )
        for _ in range(s.train_batch)
    ]
    figures = ctx.partial  # each measurement is kept as it completes
    figures |= {"preset": s.preset, "history": T, "batch": s.train_batch, "precision": str(amp)}
    figures["parity_fp32"] = _attention_parity(ctx)
    paths = [("flat", "auto")] + [("hmat", impl) for impl in attention_paths(device)]
    for variant, impl in paths:  # the plain causal one first: the least likely to fail
        cfg = dataclasses.replace(variant_config(base, variant), attn_impl=impl)
        torch.manual_seed(0)
        model = HMAT(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        stream = build_stream(users, cfg.layout).to(device)
        tokens = int(stream.valid.sum())
        name = variant if variant == "flat" else f"hmat_{impl}"
        for stage, loss_fn in (("pt", pt_loss), ("sft", sft_loss)):

            def step(model=model, opt=opt, stream=stream, loss_fn=loss_fn) -> None:
                opt.zero_grad(set_to_none=True)
                with autocast(device, amp):
                    loss = loss_fn(model, stream)
                loss.backward()
                opt.step()

            t0 = time.perf_counter()
            step()  # warm-up: what the first step costs besides (compiled kernels, allocator)
            sync(device)
            first = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(s.train_steps):
                step()
            sync(device)
            sec = (time.perf_counter() - t0) / s.train_steps
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            figures[f"{name}_{stage}"] = {
                "tokens_per_s": tokens / sec,
                "step_ms": sec * 1e3,
                "first_step_s": first,
                "max_memory_gib": peak,
            }
        del model, opt, stream
    sft = {n: figures[f"{n}_sft"]["tokens_per_s"] for n in ("flat", *(f"hmat_{i}" for i in ATTENTION_PATHS))
           if f"{n}_sft" in figures}  # fmt: skip
    best = max((n for n in sft if n != "flat"), key=sft.get)
    figures["sft_best_hmat_path"] = best
    figures["sft_ratio_best_hmat_over_flat"] = sft[best] / sft["flat"]
    figures["headline"] = (
        "SFT tok/s: "
        + ", ".join(f"{n} {v:,.0f}" for n, v in sft.items())
        + (f"; best HMAT {best} = {sft[best] / sft['flat']:.2f}x flat")
    )
    return figures


def step_bench_ranker(ctx: Context) -> dict:
    from hisam.bench import ranker as bench

    s = ctx.sizes
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--preset", s.preset, "--device", str(ctx.device), "--history", str(s.history)]
    argv += ["--candidates", str(s.bench_candidates), "--reps", str(s.bench_reps)]
    if ctx.quick:
        argv += ["--train-batch", "2", "--train-steps", "1"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = bench.main(parser.parse_args(argv))
    lines = printed.getvalue().strip().splitlines()
    if rc or not lines:
        raise RuntimeError(f"hisam bench ranker returned {rc}: {printed.getvalue()[-500:]}")
    figures = {"argv": argv, **json.loads(lines[-1]), "table": lines[:-1]}
    shown = ("one_pass_speedup", "cache_speedup", "eval_speedup")
    figures["headline"] = ", ".join(f"{key} {figures[key]:.1f}x" for key in shown if key in figures)
    return figures


def step_eval(ctx: Context) -> dict:
    from hisam.bench.ranker import grouped_eval_speed
    from models.hmat import HMAT

    s = ctx.sizes
    torch.manual_seed(0)
    model = HMAT(_ranker_config(ctx)).eval()
    with torch.no_grad():  # scores spread over (0, 1): at the init's scale they nearly tie, and AUC shows noise
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.to(ctx.device)
    speed = grouped_eval_speed(model, ctx.device, history=s.history, users=s.eval_users)
    fp32 = grouped_eval_speed(model, ctx.device, history=s.history, users=s.eval_parity_users, precision="fp32", seed=1)
    headline = (
        f"{speed['eval_rows_per_s']:,.0f} rows/s grouped vs {speed['eval_per_row_rows_per_s']:,.0f} per row "
        f"-> {speed['eval_speedup']:.1f}x; fp32 max |diff| {fp32['eval_max_abs_diff']:.1e}"
    )
    return {"auto_precision": speed, "fp32": fp32, "headline": headline}


def step_export(ctx: Context) -> dict:
    if ctx.quick:
        raise Skip("--quick: tracing the three graphs takes 30-100 s on a CPU (export/template.py)")
    import onnxruntime as ort

    from export import graphs as ex
    from export.template import check_parity, export_graphs, ort_session, probe_sequences
    from models.hmat import HMAT, build_stream

    torch.manual_seed(0)
    cfg = _ranker_config(ctx)
    model = HMAT(cfg).eval()  # exported from CPU: the serving path's export
    t0 = time.perf_counter()
    graphs = export_graphs(model, None)
    export_s = time.perf_counter() - t0
    ctx.partial["export_s"] = export_s
    probe = probe_sequences(cfg)
    cpu_check = check_parity(graphs, model, probe)
    available = ort.get_available_providers()
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
    on_provider = check_parity(graphs, model, probe, provider=provider)
    ranking = ort_session(graphs["ranking"], provider)
    feed = ex.ranking_feed(build_stream(probe, cfg.layout), cfg.rope)
    ranking.run(["scores"], feed)  # warm-up
    t0 = time.perf_counter()
    for _ in range(20):
        ranking.run(["scores"], feed)
    return {
        "preset": ctx.sizes.preset,
        "export_s": export_s,
        "graphs": sorted(graphs),
        "ort_providers": available,
        "provider": ranking.get_providers()[0],
        "check_parity_cpu_max_abs_diff": cpu_check,
        "check_parity_max_abs_diff": on_provider,
        "ranking_ms": (time.perf_counter() - t0) / 20 * 1e3,
        "headline": f"export {export_s:.1f} s; {ranking.get_providers()[0]} max |diff| {on_provider:.1e}",
    }


def ensure_protos(out: Path) -> str:
    """'present' or 'generated': ``hisam_pb`` importable, made with grpc_tools into ``out/codegen`` if needed."""
    try:
        importlib.import_module("hisam_pb.v1.events_pb2")
        return "present"
    except Exception as e:  # noqa: BLE001 - missing (git ignores it) or made for another protobuf runtime
        why = f"{type(e).__name__}: {e}"
    if not importable("grpc_tools"):
        raise Skip(f"the hisam codegen output does not import ({why}) and grpc_tools is not importable to make it")
    from hisam.codegen import generate

    root = out / "codegen"
    root.mkdir(parents=True, exist_ok=True)
    generate(root)
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "hisam_pb" or m.startswith("hisam_pb.")]:
        del sys.modules[name]  # what the failed import left behind
    importlib.invalidate_caches()
    importlib.import_module("hisam_pb.v1.events_pb2")
    return "generated"


def step_trainer(ctx: Context) -> dict:
    protos = ensure_protos(ctx.out)
    from models.hmat import HMAT, hmat_small
    from trainer.config import TrainerConfig
    from trainer.nearline import NearlineTrainer
    from trainer.testing import TOKENIZER, profile_of, synthetic_examples, tiny_config

    s, device = ctx.sizes, ctx.device
    examples = synthetic_examples(s.micro_batch + s.trainer_samples, seed=0)
    trunk = {f: getattr(hmat_small(), f) for f in ("n_layer", "hidden", "n_head", "n_kv_head", "ffn")}
    figures = ctx.partial  # each model's figure is kept as it completes
    figures |= {"protos": protos, "micro_batch": s.micro_batch, "samples": s.trainer_samples}
    models = {"tiny": tiny_config(), "small_trunk": dataclasses.replace(tiny_config(), **trunk)}
    for name, config in list(models.items())[: 2 if s.trainer_small_trunk else 1]:
        torch.manual_seed(0)
        config_ = TrainerConfig(device=str(device), window=max(1000, s.trainer_samples), min_samples=1000)
        trainer = NearlineTrainer(HMAT(config).eval(), profile_of, config_, tokenizer_version=TOKENIZER)
        trainer.process(examples[: s.micro_batch])  # warm-up
        sync(device)
        t0, trained = time.perf_counter(), 0
        for i in range(s.micro_batch, len(examples), s.micro_batch):
            trained += trainer.process(examples[i : i + s.micro_batch]).trained
        sync(device)
        figures[name] = {
            "samples_per_s": trained / (time.perf_counter() - t0),
            "precision": str(trainer.amp_dtype or "fp32"),
            "batch_size": config_.batch_size,
        }
    figures["headline"] = ", ".join(f"{m} {figures[m]['samples_per_s']:,.0f} samples/s" for m in models if m in figures)
    return figures


# The CUDA-only tests (pytest marker ``gpu``): deselected from the CPU suite (scripts/test.sh), run here.
GPU_TESTS = ("tests/models/test_hmat_attention.py", "tests/recipes/test_tokenizer_device.py")


def step_gpu_tests(ctx: Context) -> dict:
    """``pytest -m gpu`` on the test files that hold the CUDA-only tests, in a child process."""
    if ctx.device.type != "cuda":
        raise Skip("the gpu-marked tests need CUDA")
    root = Path(__file__).resolve().parents[3]
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, check=False)
    tail = done.stdout.strip().splitlines()[-1:] or [done.stderr.strip()[-300:]]
    if done.returncode != 0:
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-1000:]}")
    return {"argv": argv[3:], "summary": tail[0], "headline": tail[0]}
