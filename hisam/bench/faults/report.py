"""The fault bench's figures: one row per backend, the table, and the JSON line."""

from __future__ import annotations

import os
import platform
import sys

from hisam.bench.faults.checks import Drain, Verdict
from hisam.bench.faults.rank import FAILED, RANK_KINDS, REFUSED, RankTally
from hisam.bench.faults.services import Exit

COUNTERS = (
    "inputs_tried", "dead_lettered", "worker_exits", "stalled_partitions", "lost_actions", "doubled_actions",
    "rank_refused", "rank_internal_errors",
)  # fmt: skip


def backend_result(
    verdict: Verdict,
    rank: RankTally,
    exits: list[Exit],
    drain: Drain,
    counts: dict[str, int],
    seconds: float,
    extra: dict,
) -> dict:
    hostile_kinds = [k for k in counts if k not in RANK_KINDS]
    inputs_by_kind = {k: verdict.sent[k] for k in hostile_kinds} | {
        k: sum(rank.by_kind.get(k, {}).values()) for k in RANK_KINDS
    }
    rank_hostile = set(RANK_KINDS)
    valid_calls = rank.by_kind.get("valid", {})
    return {
        "inputs_tried": sum(inputs_by_kind.values()),
        "dead_lettered": sum(verdict.dead_by_reason.values()),
        "worker_exits": len(exits),
        "stalled_partitions": len(drain.stalled),
        "lost_actions": verdict.lost_actions,
        "doubled_actions": verdict.doubled_actions,
        "misordered_users": verdict.misordered_users,
        "rank_refused": rank.count(rank_hostile, REFUSED),
        "rank_internal_errors": rank.count(rank_hostile | {"valid"}, FAILED),
        "rank_corrupt_user": sum(rank.by_kind.get("corrupt_user", {}).values()),
        "rank_corrupt_user_codes": dict(rank.by_kind.get("corrupt_user", {})),
        "rank_valid_calls": sum(valid_calls.values()),
        "rank_valid_ok": valid_calls.get("OK", 0),
        "rank_malformed_answers": len(rank.malformed_answers),
        "valid_actions": verdict.valid_actions,
        "corrupt_user_actions": verdict.corrupt_user_actions,
        "early_item_refused": verdict.early_item_refused,
        "items_refused": dict(verdict.dead_by_kind.get("valid", {})),
        "unexpected_outcomes": verdict.n_unexpected + sum(_rank_unexpected(rank).values()),
        "stream_unexpected_outcomes": verdict.n_unexpected,
        "rank_unexpected_outcomes": sum(_rank_unexpected(rank).values()),
        "unmatched_dead_letters": verdict.unmatched_dead_letters,
        "inputs_by_kind": inputs_by_kind,
        "dead_letters_by_reason": dict(verdict.dead_by_reason),
        "dead_letters_by_kind": {k: dict(c) for k, c in verdict.dead_by_kind.items()},
        "rank_codes_by_kind": {k: dict(c) for k, c in rank.by_kind.items()},
        "seconds": round(seconds, 1),
        "drain_seconds": round(drain.seconds, 1),
        "details": {
            "unexpected": verdict.unexpected + rank.unexpected,
            "stream_problems": verdict.stream_problems,
            "stalled": drain.stalled,
            "send_refused": verdict.send_refused,
            "rank_malformed_answers": rank.malformed_answers,
            "worker_exits": [{"status": e.status, "log_tail": e.log_tail[-1500:]} for e in exits],
        },
        **extra,
    }


def _rank_unexpected(rank: RankTally) -> dict[str, int]:
    out = {}
    for kind, want in RANK_KINDS.items():
        c = rank.by_kind.get(kind, {})
        out[kind] = sum(n for code, n in c.items() if code not in want)
    c = rank.by_kind.get("valid", {})
    out["valid"] = sum(n for code, n in c.items() if code != "OK")
    return out


def totals(per_backend: dict[str, dict]) -> dict:
    keys = (*COUNTERS, "rank_corrupt_user", "misordered_users", "unexpected_outcomes", "corrupt_user_actions")
    out = {k: sum(r[k] for r in per_backend.values()) for k in keys}
    out["seconds"] = round(sum(r["seconds"] for r in per_backend.values()), 1)
    return out


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def write(result: dict, backends: list[str], out=None) -> None:
    """The table (per backend: inputs by kind with their fates, dead letters by reason, the counters), then JSON."""
    import json

    out = out or sys.stdout
    rows = [result[b] for b in backends]
    kinds = list(rows[0]["inputs_by_kind"]) if rows else []
    w = 26
    out.write("\nhisam bench faults: hostile inputs against a real broker, worker, store and Rank server\n")
    out.write(f"{'inputs by kind':<{w}}" + "".join(f"{b:>64}" for b in backends) + "\n")
    for k in kinds:
        cells = []
        for r in rows:
            fate = r["dead_letters_by_kind"].get(k) or r["rank_codes_by_kind"].get(k) or {}
            what = ",".join(f"{reason}:{n}" for reason, n in sorted(fate.items())) or "-"
            cells.append(f"{r['inputs_by_kind'][k]:>6}  {what[:56]:>56}")
        out.write(f"{k:<{w}}" + "".join(f"{c:>64}" for c in cells) + "\n")
    reasons = sorted({x for r in rows for x in r["dead_letters_by_reason"]})
    out.write(f"{'dead letters by reason':<{w}}\n")
    for reason in reasons:
        out.write(
            f"  {reason:<{w - 2}}" + "".join(f"{r['dead_letters_by_reason'].get(reason, 0):>64}" for r in rows) + "\n"
        )
    out.write(f"{'counters':<{w}}\n")
    for key in (*COUNTERS, "misordered_users", "unexpected_outcomes", "unmatched_dead_letters", "valid_actions",
                "corrupt_user_actions", "early_item_refused", "worker_log_errors", "rank_corrupt_user", "rank_valid_calls", "rank_valid_ok",
                "rank_malformed_answers", "seconds"):  # fmt: skip
        out.write(f"  {key:<{w - 2}}" + "".join(f"{r[key]:>64}" for r in rows) + "\n")
    for b in backends:
        d = result[b]["details"]
        for name in ("unexpected", "stream_problems", "stalled", "send_refused", "rank_malformed_answers"):
            for line in d[name][:8]:
                out.write(f"  {b} {name}: {line}\n")
        for e in d["worker_exits"]:
            out.write(f"  {b} worker exit {e['status']}; log ends:\n{e['log_tail']}\n")
    slim = {k: v for k, v in result.items() if k not in backends}
    for b in backends:
        slim[b] = {k: v for k, v in result[b].items() if k != "details"}
        slim[b]["details"] = {k: v[:5] for k, v in result[b]["details"].items() if k != "worker_exits"}
        slim[b]["details"]["worker_exit_statuses"] = [e["status"] for e in result[b]["details"]["worker_exits"]]
    out.write(json.dumps(slim) + "\n")
    out.flush()
