"""Shared fixtures: small random checkpoints in the Hub layout, written once per session."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Before any test module imports grpc: this process starts Ray (fork + exec) while it holds gRPC channels, as
# the router does (common/rpc/__init__.py says why).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from tests.model_configs import CONFIGS  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(name) -> path of a float32 random checkpoint for one of tests.model_configs.CONFIGS."""
    from common.checkpoint import write_random_checkpoint

    made: dict[str, str] = {}

    def make(name: str) -> str:
        if name not in made:
            out = tmp_path_factory.mktemp(f"ckpt-{name}")
            made[name] = str(write_random_checkpoint(out, CONFIGS[name], seed=1, dtype=torch.float32))
        return made[name]

    return make


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with explicit resources (never the machine's guess)."""
    import ray

    options = {
        "num_cpus": 4,
        "num_gpus": 0,
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
    }
    try:
        ray.init(**options)
    except RuntimeError:  # the head's GCS did not publish its port in time (seen once on a busy machine)
        ray.shutdown()
        ray.init(**options)
    yield ray
    ray.shutdown()
