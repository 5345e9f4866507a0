"""The tiny model families the architecture matrix and the backend tests share: each a seeded fp16 checkpoint
written by transformers' own save_pretrained."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import ARCH

# the tests' tiny Llama shape (helpers.ARCH) without its model_type, plus what every family's config needs
_BASE = {k: v for k, v in ARCH.items() if k != "model_type"} | {
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
_NO_GQA = {k: v for k, v in _BASE.items() if k != "num_key_value_heads"}

# model_type -> (config.json keys, what the family brings that the others do not)
ARCHS: dict[str, tuple[dict, str]] = {
    "llama": (_BASE, "the baseline"),
    "mistral": ({**_BASE, "sliding_window": 32}, "sliding-window attention"),
    "qwen2": ({**_BASE, "tie_word_embeddings": True}, "qkv bias, tied embeddings"),
    "qwen3": ({**_BASE, "head_dim": 32}, "q/k norms, head_dim apart from hidden/heads"),
    "gemma2": (
        {**_BASE, "head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0},
        "its own (1 + w) RMSNorms, tied embeddings, attention and final logit soft-capping",
    ),
    "phi3": ({**_BASE, "num_key_value_heads": 4}, "fused qkv_proj and gate_up_proj"),
    "gpt2": (
        {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": 256,
            "n_positions": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "Conv1D layers: weights stored (in, out), transposed before quantizing",
    ),
    "gpt_neox": (_NO_GQA, "fused query_key_value, parallel residual"),
    "opt": (
        {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 256,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 128,
            "pad_token_id": 1,
        },
        "learned positions (offset 2), biases everywhere",
    ),
    "falcon": (
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "multi-query fused query_key_value, parallel attention",
    ),
    "starcoder2": (_BASE, "LayerNorm with biases, c_fc/c_proj MLP"),
    "olmo2": (_BASE, "norms after attention and MLP, q/k norms over all heads"),
    "mixtral": (
        {**_BASE, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
        "mixture of experts: per-expert w1/w2/w3 fused into experts.gate_up_proj/down_proj on load",
    ),
    "qwen2_moe": (
        {
            **_BASE,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
        "mixture of experts with a shared expert: per-expert gate/up/down fused on load",
    ),
}


def save(model_type: str, path):
    """A seeded fp16 checkpoint of `model_type` written by transformers' own save_pretrained, in 40 KB shards."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **ARCHS[model_type][0])
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(path, max_shard_size="40KB")
    return path


def logits(model) -> torch.Tensor:
    ids = torch.arange(3, 15).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits
