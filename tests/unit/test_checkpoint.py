import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    load_model,
    load_tokenizer,
    write_random_checkpoint,
)
from common.config import ModelConfig
from tests.model_configs import CONFIGS


def test_sharded_checkpoint_loads_like_single_file(tmp_path, checkpoint_dir):
    single = checkpoint_dir("v3")
    sharded = write_random_checkpoint(
        tmp_path / "sharded", CONFIGS["v3"], seed=1, dtype=torch.float32, max_shard_bytes=64 * 1024
    )
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 3
    _, a = load_model(single, torch.float32, progress=False)
    _, b = load_model(sharded, torch.float32, progress=False)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_hub_layout_names(checkpoint_dir):
    tensors = load_file(os.path.join(checkpoint_dir("v3"), SINGLE_FILE))
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in tensors
    assert "model.layers.2.mlp.shared_experts.gate_proj.weight" in tensors
    assert tensors["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.0.mlp.up_proj.weight" in tensors  # dense layer
    assert "model.layers.0.self_attn.q_a_layernorm.weight" in tensors
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in tensors


def test_loads_a_subset_of_experts(checkpoint_dir):
    _, full = load_model(checkpoint_dir("v2_lite"), torch.float32, progress=False)
    _, shard = load_model(checkpoint_dir("v2_lite"), torch.float32, expert_ids=[2, 5], progress=False)
    for layer_full, layer_shard in zip(full.layers[1:], shard.layers[1:]):
        assert torch.equal(layer_shard.mlp.experts.w13, layer_full.mlp.experts.w13[[2, 5]])
        assert torch.equal(layer_shard.mlp.experts.w2, layer_full.mlp.experts.w2[[2, 5]])


def test_a_router_with_remote_attention_loads_no_mla_weight(checkpoint_dir):
    _, full = load_model(checkpoint_dir("v3"), torch.float32, progress=False)
    _, rest = load_model(checkpoint_dir("v3"), torch.float32, progress=False, attention=False)
    assert all(layer.self_attn is None for layer in rest.layers)
    kept = dict(rest.named_parameters())
    assert kept.keys() == {n for n in dict(full.named_parameters()) if ".self_attn." not in n}
    assert all(torch.equal(p, full.get_parameter(n)) for n, p in kept.items())


def test_a_tied_lm_head_is_the_embedding(tmp_path):
    """tie_word_embeddings: the checkpoint holds no lm_head, whose weight is the embedding's own table."""
    directory = write_random_checkpoint(tmp_path / "tied", CONFIGS["v2_lite_tied"])
    assert "lm_head.weight" not in load_file(os.path.join(directory, SINGLE_FILE))
    _, model = load_model(directory, torch.float32, progress=False)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_bfloat16_cast_on_load(checkpoint_dir):
    _, model = load_model(checkpoint_dir("v3"), torch.bfloat16, progress=False)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[2].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_tokenizer_covers_every_id(checkpoint_dir):
    path = checkpoint_dir("v2_lite")
    tok, cfg = load_tokenizer(path), ModelConfig.from_file(path)
    assert tok.get_vocab_size() == cfg.vocab_size
    assert all(tok.id_to_token(i) is not None for i in range(cfg.vocab_size))
    assert tok.id_to_token(0).startswith("<") and tok.id_to_token(1).startswith("<")


def _broken_copy(src, dst, mutate):
    dst.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (dst / name).write_text((src / name).read_text())
    tensors = load_file(src / SINGLE_FILE)
    mutate(tensors)
    save_file(tensors, dst / SINGLE_FILE)
    return dst


def test_missing_and_misshapen_tensors_are_named(tmp_path, checkpoint_dir):
    src = tmp_path.__class__(checkpoint_dir("v2_lite"))
    missing = _broken_copy(
        src, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    )
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight.*missing"):
        load_model(missing, torch.float32, progress=False)

    def reshape(t):
        t["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)

    bad = _broken_copy(src, tmp_path / "bad", reshape)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.kv_b_proj"
    ):
        load_model(bad, torch.float32, progress=False)


def test_missing_shard_file_is_named(tmp_path):
    out = write_random_checkpoint(
        tmp_path / "s", CONFIGS["v2_lite"], dtype=torch.float32, max_shard_bytes=64 * 1024
    )
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(out, torch.float32, progress=False)


def test_cli_reports_a_broken_checkpoint_and_exits_nonzero(tmp_path, checkpoint_dir):
    src = tmp_path.__class__(checkpoint_dir("v2_lite"))
    broken = _broken_copy(src, tmp_path / "b", lambda t: t.pop("lm_head.weight"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "generate",
            "--model",
            str(broken),
            "--prompt-ids",
            "1,2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "lm_head.weight" in proc.stderr and proc.stdout == ""
