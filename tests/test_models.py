"""ModelSpec: parsing of shipped and synthetic configs, parameter counts, KV and state bytes."""

import json

import pytest

from simulator.models import ModelConfigError, ModelSpec, load_model, shipped_models

# published counts (billions): model cards / technical reports
PUBLISHED = {
    "llama-3.1-8b": (8.03, 8.03),
    "llama-3.1-70b": (70.6, 70.6),
    "qwen3-30b-a3b": (30.5, 3.3),
    "deepseek-v3": (671.0, 37.0),
}


def test_shipped_models_listed():
    assert shipped_models() == [
        "deepseek-v3",
        "llama-3.1-70b",
        "llama-3.1-8b",
        "qwen3-30b-a3b",
        "qwen3.5-35b-a3b",
    ]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    total, active = PUBLISHED[name]
    m = load_model(name)
    assert m.total_params / 1e9 == pytest.approx(total, rel=0.02)
    assert m.active_params / 1e9 == pytest.approx(active, rel=0.02)


def test_qwen35_hybrid_counts():
    m = load_model("Qwen3.5-35B-A3B")  # case-insensitive
    # model card: 35B total, 3B activated (the name's A3B); text model only here
    assert m.total_params / 1e9 == pytest.approx(35.0, rel=0.02)
    assert 3.0 <= m.active_params / 1e9 <= 3.6
    assert m.num_linear_attention_layers == 30
    assert m.num_kv_layers == 10
    assert m.layer_types[3] == "full_attention" and m.layer_types[0] == "linear_attention"
    assert m.num_mtp_layers == 1
    assert m.num_shared_experts == 1 and m.shared_expert_intermediate_size == 512
    assert m.attn_output_gate


def test_deepseek_structure_and_mtp_separate():
    m = load_model("deepseek-v3")
    assert m.is_mla
    assert m.moe_layers[:3] == (False, False, False)
    assert all(m.moe_layers[3:])
    assert m.num_mtp_layers == 1
    # the MTP module (~14B with its copy of embedding and head) is not in total_params
    assert 10e9 < m.mtp_params < 14e9
    assert m.total_params / 1e9 < 675


def test_llama3_8b_kv_bytes_per_token():
    assert load_model("llama-3.1-8b").kv_bytes_per_token() == 131072  # REFERENCE.md section 6
    assert load_model("llama-3.1-8b").kv_bytes_per_token("fp8") == 65536


def test_kv_bytes_only_full_attention_layers():
    m = load_model("qwen3.5-35b-a3b")
    assert m.kv_bytes_per_token() == 10 * 2 * 2 * 256 * 2
    mla = load_model("deepseek-v3")
    assert mla.kv_bytes_per_token() == 61 * (512 + 64) * 2


def test_state_bytes_per_sequence():
    m = load_model("qwen3.5-35b-a3b")
    conv = (2 * 16 * 128 + 32 * 128) * 3
    ssm = 32 * 128 * 128
    assert m.state_bytes_per_sequence() == 30 * (conv + ssm) * 2
    assert load_model("llama-3.1-8b").state_bytes_per_sequence() == 0


def test_weight_bytes_fp8_keeps_embeddings_bf16():
    m = load_model("llama-3.1-8b")
    assert m.weight_bytes("bf16") == 2 * m.total_params
    emb = 2 * m.vocab_size * m.hidden_size
    fp8 = m.weight_bytes("fp8")
    assert fp8 > m.total_params  # embeddings stay 2 bytes
    assert fp8 == pytest.approx(m.total_params + emb, rel=1e-3)
    with pytest.raises(ValueError):
        m.weight_bytes("int4")


def test_text_config_nesting_and_path(tmp_path):
    cfg = {
        "tie_word_embeddings": True,
        "text_config": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 100,
        },
    }
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    m = load_model(str(path))
    assert m.name == "tiny"
    assert m.tie_word_embeddings
    assert m.head_dim == 16
    # 2 layers x (attn 64*64*2 + 64*32*2 + mlp 3*64*128 + norms 128) + embed + final norm
    assert m.total_params == 2 * (8192 + 4096 + 24576 + 128) + 6400 + 64


def test_missing_field_names_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64}))
    with pytest.raises(ModelConfigError, match=r"config\.json.*num_attention_heads"):
        ModelSpec.from_hf_config(path)


def test_bad_layer_type_rejected():
    cfg = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
        "layer_types": ["full_attention", "sliding_attention"],
    }
    with pytest.raises(ModelConfigError, match=r"layer_types\[1\]"):
        ModelSpec.from_hf_config(cfg)


def test_unknown_model_lists_shipped_names():
    with pytest.raises(ModelConfigError, match="llama-3.1-8b"):
        load_model("gpt-5")
    assert issubclass(ModelConfigError, ValueError)


def test_spec_is_frozen():
    m = load_model("llama-3.1-8b")
    with pytest.raises(ValueError):
        m.num_layers = 3


def test_inconsistent_moe_config_rejected():
    cfg = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "vocab_size": 10,
        "num_experts": 4,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 16,
    }
    with pytest.raises(ModelConfigError, match="num_experts_per_tok"):
        ModelSpec.from_hf_config(cfg)
