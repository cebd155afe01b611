"""The shapes of the seed jobs' hub models, written down so that planning needs no hub: `dsum train
--dry-run` and `dsum plan` build these on the meta device (no weights) when the model's config is not in
the local cache. The values are those of each model's config.json on the hub (the fields that decide its
parameters, and the dtype its weights are stored in); a model not listed here is planned from its cached config, or not at all.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1e6,
        "sliding_window": None, "tie_word_embeddings": False, "dtype": "bfloat16",
    }),
    "tiiuae/falcon-7b": ("falcon", {
        "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71, "vocab_size": 65024,
        "multi_query": True, "new_decoder_architecture": False, "parallel_attn": True, "bias": False,
        "alibi": False, "dtype": "bfloat16",
    }),
    "google/gemma-2b": ("gemma", {
        "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8,
        "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192,
        "dtype": "bfloat16",
    }),
    "google/flan-t5-base": ("t5", {
        "d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12,
        "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "dtype": "float32",
    }),
    "distilbert-base-uncased": ("distilbert", {
        "dim": 768, "hidden_dim": 3072, "n_layers": 6, "n_heads": 12, "vocab_size": 30522, "dtype": "float32",
    }),
}  # fmt: skip


def known_config(name: str):
    """The transformers config of a model listed above, else None."""
    if name not in ARCHITECTURES:
        return None
    from transformers import AutoConfig

    model_type, kwargs = ARCHITECTURES[name]
    cfg = AutoConfig.for_model(model_type, **kwargs)
    for key, value in kwargs.items():  # some configs set a field in __init__ whatever it was given
        setattr(cfg, key, value)
    return cfg
