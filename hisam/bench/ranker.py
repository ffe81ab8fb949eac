"""``hisam bench ranker``: HMAT inference and training speed against their baselines, same process.

Measured on random tokens (speed does not depend on what the tokens mean), CPU preset
unless told otherwise, one user with a T-item history and N candidates:
- one_pass_speedup: scoring N candidates one at a time (N forward passes over history +
  one candidate) over one-pass parallel ranking (one forward pass, block-diagonal mask);
- cache_speedup: full recompute (history + N candidates in one pass) over scoring the N
  candidates against the anchor KV cache of the already encoded history;
- onnx_cached_over_torch_cached: ONNX Runtime running the exported ``score_with_cache`` graph
  (export/graphs.py) over PyTorch's cache scoring, same model, cache and candidates, timed
  in alternation in this run (CPU only: null on another device);
- kv_memory_ratio: bytes of the full history K/V over bytes of the anchor cache;
- train_tokens_per_s: SFT training steps (forward, backward, AdamW) of HMAT and of the flat
  semantic-ID transformer of the same size (1-D RoPE, plain causal mask), each through its
  default attention path on the device (``train_attention``: HMAT's MA-Attn structure, the
  flat model's mask-free causal kernel; model.resolve_attn_impl);
- attention memory at history T: the bytes of one layer's dense score matrix and mask,
  full stream vs cached scoring.
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def onnx_cached_timing(model, cache, candidates: torch.Tensor, reps: int) -> dict[str, float]:
    """ONNX Runtime's cache scoring against PyTorch's on the same model, cache and candidates (CPU).

    The graph is exported once per ``export.graphs.graph_key`` (config, sources, versions and
    the weights' version) into the temp directory, since an export takes a minute; the two
    runs alternate, so the shared machine's load drifts alike for both, and the ratio is of
    their medians. ``onnx_cached_max_abs_diff``: the two paths' scores on this input.
    """
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    from export import graphs
    from models.hmat import score_with_cache

    key = graphs.graph_key(model.config, "bench-ranker", graphs.model_version(model))
    path = Path(tempfile.gettempdir()) / "hisam-bench-ranker" / key / "score_with_cache.onnx"
    if not path.exists():
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # a concurrent run never reads half a file
        graphs.export_graph(model, "score_with_cache", partial, tokenizer_version=None)
        os.replace(partial, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch's side
    # No spin-waiting after a run: idle ORT threads spinning would slow the PyTorch run after it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = graphs.cache_feed(cache, candidates)
    runs = {
        "onnx": lambda: session.run(["scores"], feed)[0],
        "torch": lambda: score_with_cache(model, cache, candidates).numpy(),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps + 1):  # the first round warms up
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    onnx_s, torch_s = statistics.median(times["onnx"]), statistics.median(times["torch"])
    return {
        "onnx_cached_ms": onnx_s * 1e3,
        "onnx_cached_torch_ms": torch_s * 1e3,
        "onnx_cached_over_torch_cached": onnx_s / torch_s,
        "onnx_cached_max_abs_diff": float(np.abs(runs["onnx"]() - runs["torch"]()).max()),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=["cpu", "small"], default="cpu")
    parser.add_argument("--history", type=int, default=300, help="history items T")
    parser.add_argument("--candidates", type=int, default=100, help="candidates N")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each timing (median reported)")
    parser.add_argument("--train-batch", type=int, default=4, help="users per SFT step")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def _median_seconds(fn, reps: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def grouped_eval_speed(
    model, device: torch.device, history: int, users: int, precision: str = "auto", seed: int = 0
) -> dict[str, float]:
    """Stream-protocol evaluation (recipes/ranker/evaluate.py) grouped by user against one stream per row.

    Same synthetic timelines, same run: ``score_timelines`` (grouped) and ``score_examples`` over
    ``timeline_examples`` (the per-row definition, stream building included). Shaped like a
    chronological split: seven users in eight have fewer than ``history`` items, whose events
    share their user's stream while history + events fit in the model's T; one in eight has
    more, so once past T every event slides the window and is scored alone
    (``eval_sliding_share`` of the rows). The diffs compare the two paths' scores and their
    AUC / GAUC (labels: the events' actions).
    """
    import numpy as np

    from recipes.ranker.evaluate import (
        Timeline,
        auc,
        event_groups,
        gauc,
        score_examples,
        score_timelines,
        timeline_examples,
    )

    T, k, kk = model.config.max_items, model.config.n_sid, model.config.codebook_size
    g = torch.Generator().manual_seed(seed)

    def draw(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, shape, generator=g)

    timelines = []
    for u in range(users):
        t0 = history + int(draw(history)) if u % 8 == 7 else int(draw(history))
        n = 1 + int(draw(history // 5 + 1))
        timelines.append(Timeline([1, 2, 3], draw(kk, t0, k), draw(2, t0), draw(kk, n, k), draw(2, n)))
    rows = sum(len(tl.event_sids) for tl in timelines)
    alone = sum(n for _, first, n in event_groups(timelines, T) if first > 0)
    options = {"precision": precision, "progress": False}
    # Warm-up of both paths, so that one-time costs (CUDA context, compiled attention kernels
    # per dtype and shape) are counted in neither.
    score_timelines(model, timelines, **options)
    score_examples(model, timeline_examples(timelines[: max(1, users // 8)], T), **options)
    t0 = time.perf_counter()
    grouped = score_timelines(model, timelines, **options)  # returned on the host: synchronised
    t_grouped = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_row = score_examples(model, timeline_examples(timelines, T), **options)
    t_per_row = time.perf_counter() - t0
    user = np.repeat(np.arange(users), [len(tl.event_sids) for tl in timelines])
    label = torch.cat([tl.event_actions for tl in timelines]).numpy()
    return {
        "eval_rows": rows,
        "eval_sliding_share": alone / rows,
        "eval_rows_per_s": rows / t_grouped,
        "eval_per_row_rows_per_s": rows / t_per_row,
        "eval_speedup": t_per_row / t_grouped,
        "eval_max_abs_diff": float(np.abs(grouped - per_row).max()),
        "eval_auc_abs_diff": abs(auc(label, grouped) - auc(label, per_row)),
        "eval_gauc_abs_diff": abs(gauc(user, label, grouped) - gauc(user, label, per_row)),
    }


def main(args: argparse.Namespace) -> int:
    from models.hmat import (
        HMAT,
        UserSequence,
        build_stream,
        encode_history,
        hmat_cpu,
        hmat_small,
        rank_candidates,
        score_with_cache,
        sft_loss,
    )
    from models.hmat.baselines import variant_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    base = (hmat_cpu if args.preset == "cpu" else hmat_small)()
    base = type(base)(**{**base.__dict__, "max_items": max(base.max_items, args.history)})
    k, kk, t, n = base.n_sid, base.codebook_size, args.history, args.candidates
    g = torch.Generator().manual_seed(0)
    profile = [1, 2, 3]
    sids = torch.randint(kk, (t, k), generator=g)
    actions = torch.randint(2, (t,), generator=g)
    cands = torch.randint(kk, (n, k), generator=g)
    model = HMAT(base).to(device).eval()
    layout = base.layout

    full = build_stream([UserSequence(profile, sids, actions, cands)], layout).to(device)
    history = build_stream([UserSequence(profile, sids, actions)], layout).to(device)
    singles = [
        build_stream([UserSequence(profile, sids, actions, cands[i : i + 1])], layout).to(device) for i in range(n)
    ]

    t_one_pass = _median_seconds(lambda: rank_candidates(model, full), args.reps, sync)
    t_one_by_one = _median_seconds(lambda: [rank_candidates(model, s) for s in singles], max(1, args.reps // 2), sync)
    cache = encode_history(model, history)
    cand_batch = cands.unsqueeze(0).to(device)
    t_cached = _median_seconds(lambda: score_with_cache(model, cache, cand_batch), args.reps, sync)
    # Exactness is the premise of the comparison: check it on this very input.
    max_diff = float((score_with_cache(model, cache, cand_batch) - rank_candidates(model, full)).abs().max())
    on_cpu = device.type == "cpu"
    onnx_cached = onnx_cached_timing(model, cache, cand_batch, 5 * args.reps) if on_cpu else {}

    with torch.no_grad():  # the full history's K/V, as a plain KV cache would keep it
        mask = model.stream_mask(history, history)
        _, present = model(history.tokens, history.rotary_positions(base.rope), mask, None, None)
    full_kv = sum(kx.numel() * kx.element_size() + vx.numel() * vx.element_size() for kx, vx in present)
    cache_kv = sum(
        kx.numel() * kx.element_size() + vx.numel() * vx.element_size() for kx, vx in zip(cache.keys, cache.values)
    )

    s_full = full.tokens.shape[1]
    s_new = n * (k + 1)
    m_cache = cache.n_slots
    heads = base.n_head
    attn_full = heads * s_full * s_full * 4 + s_full * s_full  # fp32 scores + bool mask, one layer
    attn_cached = heads * s_new * (m_cache + k + 1) * 4  # block-structured (mask.CachedBlocks): no dense mask

    train, train_attention = {}, {}
    for variant in ("hmat", "flat"):
        cfg = variant_config(base, variant)
        torch.manual_seed(0)
        m = HMAT(cfg).to(device).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        users = [
            UserSequence(profile, torch.randint(kk, (t, k), generator=g), torch.randint(2, (t,), generator=g))
            for _ in range(args.train_batch)
        ]
        stream = build_stream(users, cfg.layout).to(device)
        train_attention[variant] = type(m.stream_attention_mask(stream)).__name__

        def step(m=m, opt=opt, stream=stream):
            opt.zero_grad(set_to_none=True)
            sft_loss(m, stream).backward()
            opt.step()

        sec = _median_seconds(step, args.train_steps, sync)
        train[variant] = int(stream.valid.sum()) / sec

    evaluation = grouped_eval_speed(model, device, history=t, users=4 if device.type == "cpu" else 64)

    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, {device.type}"
    result = {
        "preset": args.preset,
        "history": t,
        "candidates": n,
        "one_pass_ms": t_one_pass * 1e3,
        "one_by_one_ms": t_one_by_one * 1e3,
        "one_pass_speedup": t_one_by_one / t_one_pass,
        "full_recompute_ms": t_one_pass * 1e3,
        "cached_ms": t_cached * 1e3,
        "cache_speedup": t_one_pass / t_cached,
        "cache_max_abs_diff": max_diff,
        "onnx_cached_over_torch_cached": onnx_cached.get("onnx_cached_over_torch_cached"),
        **{name: value for name, value in onnx_cached.items() if name != "onnx_cached_over_torch_cached"},
        "kv_full_bytes": full_kv,
        "kv_cache_bytes": cache_kv,
        "kv_memory_ratio": full_kv / cache_kv,
        "attention_bytes_per_layer_full": attn_full,
        "attention_bytes_per_layer_cached": attn_cached,
        "train_tokens_per_s": train,
        "train_tokens_per_s_ratio_hmat_over_flat": train["hmat"] / train["flat"],
        "train_attention": train_attention,
        **evaluation,
        "machine": machine,
    }
    print(f"HMAT ranker speed ({args.preset} preset, T={t} items, N={n} candidates) on {machine}")
    print(
        f"  one-pass ranking      {t_one_pass * 1e3:9.1f} ms   vs one at a time {t_one_by_one * 1e3:9.1f} ms   -> {result['one_pass_speedup']:.1f}x (target >= 20x)"
    )
    print(
        f"  anchor-cached scoring {t_cached * 1e3:9.1f} ms   vs full recompute {t_one_pass * 1e3:9.1f} ms   -> {result['cache_speedup']:.1f}x (target >= 10x); max |diff| {max_diff:.2e}"
    )
    if onnx_cached:
        print(
            f"  ONNX Runtime cached   {onnx_cached['onnx_cached_ms']:9.1f} ms   vs PyTorch cached  {onnx_cached['onnx_cached_torch_ms']:9.1f} ms   -> {onnx_cached['onnx_cached_over_torch_cached']:.2f}x (target <= 1.2x); max |diff| {onnx_cached['onnx_cached_max_abs_diff']:.2e}"
        )
    print(
        f"  KV memory             {cache_kv / 2**20:9.2f} MiB vs full history   {full_kv / 2**20:9.2f} MiB -> {result['kv_memory_ratio']:.2f}x smaller (target >= 3.5x)"
    )
    print(
        f"  attention, one layer  {attn_cached / 2**20:9.2f} MiB cached vs {attn_full / 2**20:9.2f} MiB full stream (dense scores + mask)"
    )
    print(
        f"  SFT training          HMAT {train['hmat']:,.0f} tokens/s vs flat {train['flat']:,.0f} tokens/s -> {result['train_tokens_per_s_ratio_hmat_over_flat']:.2f}x"
    )
    print(
        f"  stream-protocol eval  {evaluation['eval_rows_per_s']:9,.1f} rows/s grouped by user vs {evaluation['eval_per_row_rows_per_s']:,.1f} one stream per row -> {evaluation['eval_speedup']:.1f}x (target >= 10x on a GPU); {evaluation['eval_rows']} rows, {evaluation['eval_sliding_share']:.0%} past the window; max |diff| {evaluation['eval_max_abs_diff']:.2e}"
    )
    print(json.dumps(result))
    return 0
