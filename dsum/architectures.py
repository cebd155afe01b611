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
    # not a seed job's model: the 70B class that PEFT's guide fine-tunes with QLoRA under ZeRO-3 on two GPUs
    "meta-llama/Llama-2-70b-hf": ("llama", {
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "dtype": "float16",
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


def share_embeddings(model, checkpoint=None) -> None:
    """An encoder-decoder's encoder and decoder read its one shared embedding, as loading a hub checkpoint
    makes them (T5's checkpoints store the three with equal values; transformers 5 ties equal ones, and
    leaves FLAN-T5's own lm_head apart). A model built from FLAN-T5's config (tie_word_embeddings=false)
    would hold three embeddings instead.

    The head: transformers 5.24 sets T5's tie_word_embeddings=True whatever config.json says (it keeps the
    file's false as scale_decoder_outputs=False: models/t5/configuration_t5.py) and ties the head only where
    the checkpoint stores it equal to the embedding. So a local `checkpoint` directory is asked (its two
    tensors compared); without one, config.json's word decides (T5 v1.1 and FLAN-T5 say false: a head of
    their own)."""
    shared = getattr(model, "shared", None)
    if shared is None:
        return
    for stack in (model.get_encoder(), getattr(model, "decoder", None)):
        if stack is not None and getattr(stack, "embed_tokens", None) is not None:
            stack.embed_tokens.weight = shared.weight
    head = getattr(model, "lm_head", None)
    if head is None or head.weight is not shared.weight:
        return
    apart = _stored_apart(checkpoint) if checkpoint is not None else None
    if apart is None:
        apart = getattr(model.config, "scale_decoder_outputs", True) is False
    if apart:
        import torch

        head.weight = torch.nn.Parameter(torch.empty_like(shared.weight), requires_grad=shared.weight.requires_grad)


def _stored_apart(checkpoint) -> bool | None:
    """Whether a local checkpoint stores lm_head.weight unequal to shared.weight (None: no safetensors)."""
    from pathlib import Path

    import torch
    from safetensors import safe_open

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        return None
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in ("lm_head.weight", "shared.weight"):
                if key in f.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
                    tensors[key] = f.get_tensor(key)
    if "lm_head.weight" not in tensors:
        return False
    return "shared.weight" not in tensors or not torch.equal(tensors["lm_head.weight"], tensors["shared.weight"])


TINY_SHAPES: dict[str, dict[str, Any]] = {
    "mistral": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 1024},
    "falcon": {"hidden_size": 64, "ffn_hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    "gemma": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 1024},
    "t5": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2},
    "distilbert": {"dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 1024},
}  # fmt: skip
"""Each seed family at a width two CPU cores train in seconds; every other field (grouped-query or
multi-query heads, parallel attention, gated MLPs, tied embeddings, the dtype) stays the seed model's. Every
layer a QLoRA job quantizes has a multiple of 32 outputs, as real models do: bitsandbytes' CPU 4-bit kernel
needs it (functional.py, _convert_weight_packed_for_cpu, block_n=32)."""
TASKS = {"mistral": "causal", "falcon": "causal", "gemma": "causal", "t5": "seq2seq", "distilbert": "classification"}


def build_tiny(name: str, out, num_labels: int = 2, seed: int = 0):
    """A seed model's architecture (ARCHITECTURES[name]) at TINY_SHAPES' width, with random weights and the
    byte-level BPE tokenizer dsum trains offline (its vocabulary and special ids put into the config), saved
    as a local checkpoint that `model.name=<out>` loads as the hub model would be. Returns `out`."""
    from pathlib import Path

    import torch
    import transformers

    from dsum import model as models

    model_type, _ = ARCHITECTURES[name]
    cfg = known_config(name)
    for key, value in TINY_SHAPES[model_type].items():
        setattr(cfg, key, value)
    task = TASKS[model_type]
    tokenizer = models.build_tokenizer(vocab_size=1024, chat=task == "causal")
    cfg.vocab_size = len(tokenizer)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )  # fmt: skip
    if task == "seq2seq":
        cfg.decoder_start_token_id = tokenizer.pad_token_id
    if task == "classification":
        cfg.num_labels = num_labels
    torch.manual_seed(seed)
    auto = getattr(transformers, models.AUTO_CLASSES[task])
    net = auto.from_config(cfg, dtype=getattr(torch, str(cfg.dtype).removeprefix("torch.")))
    share_embeddings(net)
    out = Path(out)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
