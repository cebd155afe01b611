"""Model building: presets, target-module discovery (quantized layers included), methods, counts."""

import pytest

from dsum import model
from dsum.config import MethodConfig, ModelConfig

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_all_linear_excludes_head():
    base = model.load_base(ModelConfig(), MethodConfig())
    assert model.adapted_modules(model.apply_method(base, "causal", MethodConfig())) == LLAMA_LINEAR
    named = MethodConfig(target_modules=["q_proj", "v_proj"])
    assert model.adapted_modules(model.apply_method(model.load_base(ModelConfig(), named), "causal", named)) == [
        "q_proj",
        "v_proj",
    ]


def test_all_linear_finds_4bit_layers():
    qlora = MethodConfig(name="qlora", bits=4)
    base = model.load_base(ModelConfig(), qlora)
    kinds = {type(m).__name__ for m in base.modules()}
    assert "Linear4bit" in kinds
    peft_model = model.apply_method(base, "causal", qlora)
    assert model.adapted_modules(peft_model) == LLAMA_LINEAR
    counts = model.parameter_counts(peft_model)
    assert 0 < counts["trainable_params"] < counts["total_params"]


def test_unknown_target_module_names_what_exists():
    base = model.load_base(ModelConfig(), MethodConfig())
    with pytest.raises(
        model.ModelError,
        match=r"method.target_modules: query_key_value not found in the model; its linear layers are: down_proj",
    ):
        model.apply_method(base, "causal", MethodConfig(target_modules=["query_key_value"]))


def test_lora_trainable_count_is_exact():
    base = model.load_base(ModelConfig(), MethodConfig())
    h, layers, r = 64, 2, 4  # the default tiny preset: hidden 64, 2 layers
    peft_model = model.apply_method(base, "causal", MethodConfig(r=r, target_modules=["q_proj", "v_proj"]))
    # each adapted h×h projection adds A (r×h) and B (h×r)
    assert model.parameter_counts(peft_model)["trainable_params"] == layers * 2 * (r * h + h * r)


def test_presets_for_each_task():
    t5 = model.load_base(ModelConfig(name="tiny-t5", task="seq2seq"), MethodConfig())
    assert model.adapted_modules(model.apply_method(t5, "seq2seq", MethodConfig())) == ["k", "o", "q", "v", "wi", "wo"]
    bert = model.load_base(ModelConfig(name="tiny-bert", task="classification", num_labels=3), MethodConfig())
    assert bert.config.num_labels == 3
    adapted = model.apply_method(bert, "classification", MethodConfig())
    assert "classifier" not in model.adapted_modules(adapted) and "query" in model.adapted_modules(adapted)


def test_preset_weights_are_cached_and_seeded(tmp_path, monkeypatch):
    cfg = ModelConfig()
    a = model.preset_dir(cfg.name, cfg.tiny)
    written = (a / "model.safetensors").stat().st_mtime_ns
    assert model.preset_dir(cfg.name, cfg.tiny) == a and (a / "model.safetensors").stat().st_mtime_ns == written
    monkeypatch.setenv("DSUM_CACHE", str(tmp_path))  # another machine's cache: built again, the same weights
    b = model.preset_dir(cfg.name, cfg.tiny)
    assert b != a and (b / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()


def test_unreachable_hub_model_is_one_line_error():
    with pytest.raises(model.ModelError, match=r"^model.name: could not load the tokenizer of 'org/not-a-model'"):
        model.load_tokenizer(ModelConfig(name="org/not-a-model"))


def test_4bit_weights_packed_in_a_float_storage_are_the_same_bits():
    """ZeRO-3 shards float tensors: a float quant storage (JobConfig.quant_storage) packs bitsandbytes' same
    4-bit codes in float32 words, and the rest of the model loads in that dtype; the layers compute the same."""
    import bitsandbytes as bnb
    import torch

    qlora = MethodConfig(name="qlora", bits=4)
    plain = model.load_base(ModelConfig(), qlora)
    packed = model.load_base(ModelConfig(), qlora, quant_storage="float32")
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers and {m.weight.dtype for m in layers.values()} == {torch.float32}
    for name, layer in layers.items():
        other = plain.get_submodule(name)
        assert other.weight.dtype == torch.uint8
        assert torch.equal(layer.weight.data.view(torch.uint8).flatten(), other.weight.data.flatten())
    x = torch.randint(0, 100, (1, 12))
    assert torch.allclose(plain(x).logits, packed(x).logits)
