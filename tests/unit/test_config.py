import json

import pytest

from common.config import ConfigError, ModelConfig
from tests.model_configs import CONFIGS
from tests.published_configs import PUBLISHED


def test_both_rope_spellings_parse_alike():
    hub = dict(CONFIGS["v2_group_yarn"])
    newer = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling")}
    scaling = dict(hub["rope_scaling"])
    scaling["rope_type"] = scaling.pop("type")
    newer["rope_parameters"] = {"rope_theta": hub["rope_theta"], **scaling}
    a, b = ModelConfig.from_dict(hub), ModelConfig.from_dict(newer)
    assert a.rope == b.rope
    assert a.rope.type == "yarn" and a.rope.factor == 16 and a.rope.mscale_all_dim == 0.707
    assert a.softmax_scale > a.qk_head_dim**-0.5  # YaRN's mscale^2 boosts the softmax scale


def test_defaults_follow_the_model_type():
    v3 = {k: v for k, v in CONFIGS["v3"].items() if k not in ("topk_method", "scoring_func")}
    cfg = ModelConfig.from_dict(v3)
    assert (cfg.topk_method, cfg.scoring_func, cfg.rope_interleave) == ("noaux_tc", "sigmoid", True)
    v2 = {k: v for k, v in CONFIGS["v2_lite"].items() if k not in ("topk_method", "scoring_func")}
    cfg = ModelConfig.from_dict(v2)
    assert (cfg.topk_method, cfg.scoring_func) == ("greedy", "softmax")


def test_unknown_harmless_fields_are_ignored():
    cfg = ModelConfig.from_dict({**CONFIGS["v2_greedy_qlora"], "some_future_field": 3, "use_cache": True})
    assert cfg.extra["some_future_field"] == 3


def test_moe_layer_freq_and_dense_layers():
    cfg = ModelConfig.from_dict({**CONFIGS["v3"], "num_hidden_layers": 7, "moe_layer_freq": 2})
    assert cfg.moe_layers == [2, 4, 6]


def test_latent_cache_width():
    cfg = ModelConfig.from_dict(CONFIGS["v3"])
    assert cfg.latent_dim == cfg.kv_lora_rank + cfg.qk_rope_head_dim


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"topk_method": "best"}, "topk_method"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, "n_group"),
        ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"kv_lora_rank": None}, "kv_lora_rank"),
        ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ],
)
def test_unservable_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**CONFIGS["v2_greedy_qlora"], **change})


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["v3"]))
    assert ModelConfig.from_file(tmp_path).model_type == "deepseek_v3"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_parse(name):
    cfg = ModelConfig.from_dict(PUBLISHED[name])
    assert cfg.latent_dim == 576 and cfg.rope.type == "yarn"
    assert cfg.extra.get("aux_loss_alpha") is not None  # training-only fields are kept aside, not rejected
