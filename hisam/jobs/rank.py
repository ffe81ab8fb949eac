"""``hisam rank USER ITEM...``: ask a running Rank server (``hisam serve``) and print the ranking."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", type=int, help="user id")
    parser.add_argument("items", type=int, nargs="+", help="candidate item ids")
    parser.add_argument("--address", default=os.environ.get("HISAM_RANK_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    parser.add_argument("--request-id", default="")
    from serving.security import add_client_security_arguments

    add_client_security_arguments(parser)


def main(args: argparse.Namespace) -> int:
    import grpc

    from hisam_pb.v1 import rank_pb2, rank_pb2_grpc
    from serving.security import client_security_from_args, rank_channel

    request = rank_pb2.RankRequest(user_id=args.user, item_ids=args.items, request_id=args.request_id)
    with rank_channel(args.address, client_security_from_args(args)) as channel:
        try:
            resp = rank_pb2_grpc.RankingServiceStub(channel).Rank(request, timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"Rank failed: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    cold = " (cold user: profile only)" if resp.history_len == 0 else ""
    print(f"user {args.user}: {resp.history_len} history items{cold}, model {resp.model_version or '-'}")
    print(f"{'rank':>4}  {'item':>10}  {'score':>8}  status")
    for n, it in enumerate(resp.items, 1):
        status = rank_pb2.ItemStatus.Name(it.status).removeprefix("ITEM_STATUS_").lower()
        score = f"{it.score:8.4f}" if it.status == rank_pb2.ITEM_STATUS_SCORED else f"{'-':>8}"
        print(f"{n:>4}  {it.item_id:>10}  {score}  {status}")
    return 0
