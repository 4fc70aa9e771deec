"""The `latentmoe` command's contracts: other tools parse exactly this output."""

import json
import subprocess
import sys

from common.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_json_one_object_per_prompt_in_order(checkpoint_dir):
    path = checkpoint_dir("v2_lite")
    proc = run_cli(
        "generate",
        "--model",
        path,
        "--prompt-ids",
        "1,2,3",
        "--prompt",
        "bana lo",
        "--prompt-ids",
        "4,5",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--dtype",
        "float32",
        "--json",
        "--kv-cache-memory",
        "4000000",
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[0]["prompt_token_ids"] == [1, 2, 3] and records[2]["prompt_token_ids"] == [4, 5]
    assert records[1]["prompt_token_ids"][0] == 0  # text prompts get the BOS token
    for r in records:
        assert len(r["token_ids"]) == 6 and isinstance(r["text"], str) and r["finish_reason"] == "length"

    engine = LLMEngine.from_checkpoint(path, EngineConfig(dtype="float32", kv_cache_memory=4e6))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    direct = engine.generate([[1, 2, 3], "bana lo", [4, 5]], params)
    assert [r["token_ids"] for r in records] == [o.outputs[0].token_ids for o in direct]
    assert [r["text"] for r in records] == [o.outputs[0].text for o in direct]


def test_init_checkpoint_writes_the_hub_layout(tmp_path):
    proc = run_cli("init-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "t"), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (tmp_path / "t" / name).is_file()
    assert json.loads((tmp_path / "t" / "config.json").read_text())["model_type"] == "deepseek_v2"


def test_bad_arguments_are_clear_errors(checkpoint_dir):
    proc = run_cli("generate", "--model", checkpoint_dir("v2_lite"), "--prompt-ids", "1,x")
    assert proc.returncode == 2 and "--prompt-ids takes comma-separated integers" in proc.stderr
    proc = run_cli(
        "generate", "--model", checkpoint_dir("v2_lite"), "--prompt-ids", "1,99999", "--dtype", "float32"
    )
    assert proc.returncode == 2 and "prompt token ids must be integers in [0, 384)" in proc.stderr
