"""The Ray job entry: the router's engine on an existing Ray cluster, its routed experts on expert actors.

Submitted from the repository root (the job's working directory), against a running cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m deploy.ray.job --model mini --expert-workers 2 --prompt "The experts" --max-tokens 32 \\
        --temperature 0

or run as a driver on a cluster node: `python -m deploy.ray.job ...`, or as a lone script through the cluster
launcher: `ray submit deploy/ray/cluster.yaml deploy/ray/job.py --model mini ...` (it joins the cluster with
`ray.init(address="auto")`, or --ray-address). It places one expert actor per shard of routed experts
(`ExpertPool`: a placement group spread over the nodes, a GPU each when the cluster has one per shard), loads
the model without its routed experts (`local_experts=False`), routes every MoE layer through the actors
(`ExpertPool.attach`), generates, prints one JSON object per prompt per line, in prompt order (the records of
`latentmoe generate --json`: index, prompt_token_ids, token_ids, text, finish_reason) and exits.

--model is a checkpoint directory or a preset (tiny, mini); the expert actors read the same path, so on a
multi-node cluster it must exist at that path on every node (a shared file system, or the setup commands of
deploy/ray/cluster.yaml, which write the `mini` preset on every node).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from services.cli import (
    add_engine_args,
    add_generation_args,
    completion_record,
    engine_config,
    sampling_params,
)

log = logging.getLogger("latentmoe.ray_job")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.ray.job", description=__doc__.split("\n")[0])
    add_engine_args(p, model_help="checkpoint directory on every node, or a preset (tiny, mini)")
    p.add_argument("--expert-workers", type=int, default=2, help="expert actors (one shard of experts each)")
    p.add_argument("--ray-address", default="auto", help="the cluster to join (default: this node's)")
    add_generation_args(p)  # the prompts and sampling flags of `latentmoe generate`
    p.add_argument("--log-level", default="INFO", help="level of the job's own log lines (stderr)")
    return p


def run(args: argparse.Namespace) -> int:
    import ray

    from common.checkpoint import resolve_model
    from common.engine.engine import LLMEngine
    from services.router.experts import ExpertPool

    params = sampling_params(args)
    config = engine_config(args)
    model_dir = str(resolve_model(args.model))
    ray.init(address=args.ray_address)
    pool = None
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        log.info(
            "joined the Ray cluster: %d nodes, %g CPUs, %g GPUs",
            nodes,
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )
        engine = LLMEngine.from_checkpoint(model_dir, config, local_experts=False)
        experts = engine.model_config.n_routed_experts
        if not 1 <= args.expert_workers <= experts:
            raise ValueError(f"--expert-workers must be 1..{experts} (the model's routed experts)")
        # The actors compute in the engine's dtype, so the numbers are those of the in-process engine.
        pool = ExpertPool(model_dir, args.expert_workers, str(config.torch_dtype).removeprefix("torch."))
        placed = ray.util.placement_group_table(pool.placement_group)["bundles_to_node_id"]
        log.info(
            "placed %d expert actors on %d nodes: %s",
            len(pool.shards),
            len(set(placed.values())),
            ", ".join(f"{s.name}@{s.address} {e[0]}..{e[-1]}" for s, e in zip(pool.shards, pool.expert_map)),
        )
        pool.attach(engine.runner.model)
        for i, out in enumerate(engine.generate(args.prompts, params)):
            print(json.dumps(completion_record(i, out), ensure_ascii=False), flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "prompts", None):
        parser.error("give at least one --prompt or --prompt-ids")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from common.checkpoint import CheckpointError
    from common.config import ConfigError

    try:
        return run(args)
    except (CheckpointError, ConfigError, ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
