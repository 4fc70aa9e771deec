"""`latentmoe client`: talk to any router (embedded or distributed) over gRPC.

latentmoe client generate --address 127.0.0.1:50051 --prompt "Hello" --max-tokens 32
latentmoe client info --address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from latentmoe.v1 import router_pb2, router_pb2_grpc


def cmd_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        print("error: give exactly one of --prompt and --prompt-ids", file=sys.stderr)
        return 2
    request = router_pb2.GenerateRequest(request_id=args.request_id or "")
    if args.prompt is not None:
        request.text = args.prompt
    else:
        request.token_ids.ids.extend(int(t) for t in args.prompt_ids.split(",") if t.strip())
    p = request.params
    p.max_tokens = args.max_tokens
    p.temperature = args.temperature
    p.top_p = args.top_p
    p.top_k = args.top_k
    p.ignore_eos = args.ignore_eos
    if args.seed is not None:
        p.seed = args.seed
    p.n = args.n
    with grpc.insecure_channel(args.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        try:
            for response in stub.Generate(request, timeout=args.timeout):
                for c in response.completions:
                    if args.json:
                        record = {
                            "request_id": response.request_id,
                            "index": c.index,
                            "delta_token_ids": list(c.delta_token_ids),
                            "delta_text": c.delta_text,
                            "finish_reason": c.finish_reason or None,
                            "finished": response.finished,
                        }
                        print(json.dumps(record, ensure_ascii=False), flush=True)
                    else:
                        print(c.delta_text, end="", flush=True)
            if not args.json:
                print()
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 3 if e.code() == grpc.StatusCode.UNAVAILABLE else 2
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.address) as channel:
        try:
            info = router_pb2_grpc.RouterStub(channel).ModelInfo(
                router_pb2.ModelInfoRequest(), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 3
    fields = {f.name: v for f, v in info.ListFields() if f.name != "config_json"}
    print(json.dumps(fields, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    client = sub.add_parser("client", help="talk to a router over gRPC").add_subparsers(
        dest="client", required=True
    )
    p = client.add_parser("generate", help="stream a generation")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids")
    p.add_argument("--request-id", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true", help="one JSON object per streamed delta")
    p.set_defaults(func=cmd_generate)
    p = client.add_parser("info", help="the served model")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=cmd_info)
