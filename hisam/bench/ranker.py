"""``hisam bench ranker``: HMAT inference and training speed against their baselines, same process.

Measured on random tokens (speed does not depend on what the tokens mean), CPU preset
unless told otherwise, one user with a T-item history and N candidates:
- one_pass_speedup: scoring N candidates one at a time (N forward passes over history +
  one candidate) over one-pass parallel ranking (one forward pass, block-diagonal mask);
- cache_speedup: full recompute (history + N candidates in one pass) over scoring the N
  candidates against the anchor KV cache of the already encoded history;
- kv_memory_ratio: bytes of the full history K/V over bytes of the anchor cache;
- train_tokens_per_s: SFT training steps (forward, backward, AdamW) of HMAT and of the flat
  semantic-ID transformer of the same size (1-D RoPE, plain causal mask);
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

    train = {}
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

        def step(m=m, opt=opt, stream=stream):
            opt.zero_grad(set_to_none=True)
            sft_loss(m, stream).backward()
            opt.step()

        sec = _median_seconds(step, args.train_steps, sync)
        train[variant] = int(stream.valid.sum()) / sec

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
        "kv_full_bytes": full_kv,
        "kv_cache_bytes": cache_kv,
        "kv_memory_ratio": full_kv / cache_kv,
        "attention_bytes_per_layer_full": attn_full,
        "attention_bytes_per_layer_cached": attn_cached,
        "train_tokens_per_s": train,
        "train_tokens_per_s_ratio_hmat_over_flat": train["hmat"] / train["flat"],
        "machine": machine,
    }
    print(f"HMAT ranker speed ({args.preset} preset, T={t} items, N={n} candidates) on {machine}")
    print(
        f"  one-pass ranking      {t_one_pass * 1e3:9.1f} ms   vs one at a time {t_one_by_one * 1e3:9.1f} ms   -> {result['one_pass_speedup']:.1f}x (target >= 20x)"
    )
    print(
        f"  anchor-cached scoring {t_cached * 1e3:9.1f} ms   vs full recompute {t_one_pass * 1e3:9.1f} ms   -> {result['cache_speedup']:.1f}x (target >= 10x); max |diff| {max_diff:.2e}"
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
    print(json.dumps(result))
    return 0
