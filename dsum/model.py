"""Models: tokenizer and base model (hub id, local dir, or offline tiny preset), quantization, LoRA/full.

Tiny presets are built once from config with a seeded init and a BPE tokenizer trained offline on the
bundled data, then saved to a cache directory; from there they load through `from_pretrained` exactly as a
hub checkpoint does, so the quantized (QLoRA) path is the same code for both.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dsum.config import TINY_PRESETS, MethodConfig, ModelConfig, TinyModelConfig
from dsum.data import BUNDLED
from dsum.errors import DsumError, one_line

# The presets' vocabulary is learned from the bundled dialogues and reviews. The bundled documents are
# read through it byte-level (news words in more pieces) rather than take merges from the dialogues.
TOKENIZER_CORPUS = (BUNDLED["bundled"], BUNDLED["bundled-reviews"])
PRESET_VERSION = 2  # bump when preset building changes, so caches are rebuilt
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
AUTO_CLASSES = {
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
}
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


LINEAR_SUBCLASSES = {"falcon": ("transformers.models.falcon.modeling_falcon", "FalconLinear")}
"""Dense layers some architectures build as their own subclass of nn.Linear, whose forward is nn.Linear's
(FalconLinear: `x @ W.T + b`). transformers 5 converts to bitsandbytes only modules whose type *is*
nn.Linear (integrations/bitsandbytes.py, replace_with_bnb_linear), so these would stay in full precision
under a 4/8-bit load: see `plain_linear_layers`."""


class ModelError(DsumError):
    pass


@contextlib.contextmanager
def plain_linear_layers(model_type: str | None):
    """While the body builds a model of `model_type`, its modeling module's nn.Linear subclass
    (LINEAR_SUBCLASSES) is nn.Linear itself, so the model's dense layers are built as plain Linear and the
    quantizer converts them; the name is restored on the way out, so other models and later loads see the
    subclass again. (Not an upstream fix: transformers' check is deliberate, a subclass may compute something
    else; dsum lists only subclasses whose forward is nn.Linear's. One thread builds models at a time.)"""
    if model_type not in LINEAR_SUBCLASSES:
        yield
        return
    import importlib

    module_name, attr = LINEAR_SUBCLASSES[model_type]
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    setattr(module, attr, nn.Linear)
    try:
        yield
    finally:
        setattr(module, attr, original)


def quantized_layers(skeleton: nn.Module, method: MethodConfig) -> list[str]:
    """Names of the layers a `method.bits` load puts in k bits, as transformers decides it: its own
    bitsandbytes quantizer's step before the weights load (which modules it leaves out: tied and output
    embeddings, the last module, the model's _keep_in_fp32_modules such as T5's `wo`; then
    replace_with_bnb_linear), run on a weightless copy. A classification model's classifier is among them."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config(method), pre_quantized=False)
    converted = copy.deepcopy(skeleton)
    quantizer._process_model_before_weight_loading(converted, device_map={"": "cpu"})  # checked with transformers 5.24
    return [name for name, m in converted.named_modules() if _is_quantized(m)]


def check_quantizable(skeleton: nn.Module, cfg: ModelConfig, method: MethodConfig) -> None:
    """A model with no layer the quantizer would convert (quantized_layers, on a weightless copy) is one line
    before anything starts, not a worker's error after the cluster is up."""
    if not quantized_layers(skeleton, method):
        raise ModelError(f"method.bits: {cfg.name!r} has no layer bitsandbytes could quantize to {method.bits} bits")


def cache_dir() -> Path:
    return Path(os.environ.get("DSUM_CACHE", Path.home() / ".cache" / "dsum"))


# ------------------------------------------------------------------------------------------ tiny presets


def preset_dir(name: str, tiny: TinyModelConfig, num_labels: int = 2) -> Path:
    """Directory of a tiny preset (tokenizer + seeded random weights), built on first use."""
    corpus = b"".join(p.read_bytes() for p in TOKENIZER_CORPUS)
    key = json.dumps([PRESET_VERSION, name, tiny.model_dump(), num_labels, hashlib.sha256(corpus).hexdigest()])
    path = cache_dir() / "presets" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".build-"))
    try:
        tokenizer = build_tokenizer(tiny.vocab_size, chat=TINY_PRESETS[name] == "causal")
        model = _tiny_model(name, tiny, tokenizer, num_labels)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)  # another process may have won
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tokenizer(vocab_size: int, chat: bool):
    """Byte-level BPE trained on the bundled dialogues and reviews: offline and deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for path in TOKENIZER_CORPUS:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [v for k, v in row.items() if k != "id" and isinstance(v, str)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # add_special_tokens=True wraps a text as <s> text </s> (what a classifier reads); dsum's prompting
    # adds special tokens itself.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        model_max_length=1024,
    )
    if chat:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def _tiny_model(name: str, tiny: TinyModelConfig, tokenizer, num_labels: int):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    torch.manual_seed(0)
    if name == "tiny-llama":
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_heads,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            **ids,
        )
        return LlamaForCausalLM(cfg)
    if name == "tiny-t5":
        cfg = T5Config(
            vocab_size=len(tokenizer),
            d_model=tiny.hidden_size,
            d_kv=tiny.hidden_size // tiny.num_heads,
            d_ff=tiny.intermediate_size,
            num_layers=tiny.num_layers,
            num_decoder_layers=tiny.num_layers,
            num_heads=tiny.num_heads,
            decoder_start_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **ids,
        )
        t5 = T5ForConditionalGeneration(cfg)
        # T5 draws an untied head at std 1 (logits of std ~sqrt(d_model): a first loss near 40 that takes
        # hundreds of steps to come down); scale it as a tied T5 scales its decoder output, by d_model^-0.5.
        with torch.no_grad():
            t5.lm_head.weight.mul_(tiny.hidden_size**-0.5)
        return t5
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        max_position_embeddings=1024,
        num_labels=num_labels,
        **ids,
    )
    return BertForSequenceClassification(cfg)


# ---------------------------------------------------------------------------------------- base + method


def resolve_path(cfg: ModelConfig) -> str:
    """Where from_pretrained reads: the preset's cache dir, a local dir, or the hub id."""
    return str(preset_dir(cfg.name, cfg.tiny, cfg.num_labels)) if cfg.is_preset else cfg.name


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ModelError(f"model.name: could not load the tokenizer of {cfg.name!r}: {one_line(e)}") from None
    if tok.pad_token is None:  # decoder-only checkpoints often ship without one
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    cfg: ModelConfig, method: MethodConfig, path: str | None = None, device_map=None, quant_storage: str = "uint8"
):
    """The base model, quantized with bitsandbytes when method.bits is set, its 4-bit weights packed in
    quant_storage (JobConfig.quant_storage); a float storage is also the dtype the rest loads in."""
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[cfg.task])
    kwargs: dict = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "dtype": _dtype(cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.task == "classification":
        kwargs["num_labels"] = cfg.num_labels
    if method.bits:
        kwargs["quantization_config"] = quantization_config(method, quant_storage)
        if quant_storage != "uint8":
            kwargs["dtype"] = getattr(torch, quant_storage)
        kwargs["device_map"] = device_map or ({"": "cpu"} if not torch.cuda.is_available() else None)
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with plain_linear_layers(_model_type(path or resolve_path(cfg), cfg) if method.bits else None):
            model = auto.from_pretrained(path or resolve_path(cfg), **kwargs)
    except ImportError as e:
        raise ModelError(f"method.bits: {one_line(e)}") from None
    except Exception as e:
        raise ModelError(f"model.name: could not load {cfg.name!r}: {one_line(e)}") from None
    if method.bits and not any(_is_quantized(m) for m in model.modules()):
        raise ModelError(f"method.bits: {cfg.name!r} has no layer bitsandbytes could quantize to {method.bits} bits")
    return model


def keep_4bit_layout(model: nn.Module) -> None:
    """bitsandbytes (0.50, nn/modules.py Linear4bit.forward) repacks a 4-bit weight for its CPU kernel the
    first time the layer runs without gradients on a CPU with AVX512-BF16 (an evaluation), replacing
    weight.data and marking the quant state. Under ZeRO-3, DeepSpeed owns weight.data (it gathers the shards
    before each forward and frees them after), so the repacked layout is lost while the quant state still
    says it is there: later forwards read the weight wrongly and saving fails (an assertion in
    _convert_weight_packed_for_cpu_inverse). Under ZeRO-3 the layers keep the layout they were loaded in."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantization_config(method: MethodConfig, quant_storage: str = "uint8"):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelError(f"method.bits: bitsandbytes is not usable here ({one_line(e)})") from None
    if method.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=_dtype(method.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant_storage),
    )


def apply_method(model, task: str, method: MethodConfig, gradient_checkpointing: bool = False):
    """Wrap the base for training: LoRA adapters (after k-bit preparation for QLoRA) or all weights trainable.

    'all-linear' is resolved by peft (every linear layer, 4-bit ones included, but the output head).
    """
    if method.name == "full":
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if method.bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    task_type = {"causal": TaskType.CAUSAL_LM, "seq2seq": TaskType.SEQ_2_SEQ_LM, "classification": TaskType.SEQ_CLS}[
        task
    ]
    targets = method.target_modules
    if targets != "all-linear":
        _check_targets(model, targets)
    lora = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets if targets == "all-linear" else list(targets),
        modules_to_save=method.modules_to_save or None,
        task_type=task_type,
        bias="none",
    )
    return get_peft_model(model, lora)


def adapted_modules(peft_model) -> list[str]:
    """Leaf names of the layers peft put adapters on (what 'all-linear' resolved to)."""
    targets = peft_model.peft_config["default"].target_modules
    return sorted({name.rsplit(".", 1)[-1] for name in targets})


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Named target modules must exist: a one-line error listing the model's linear layers otherwise
    (peft's own error names neither the config field nor what would have been valid)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)} - set(HEAD_NAMES)
        )
        raise ModelError(
            f"method.target_modules: {', '.join(missing)} not found in the model; its linear layers are: {', '.join(linear)}"
        )


def load_trained(cfg: ModelConfig, method: MethodConfig, weights: str, base=None, device_map=None):
    """A trained model from a run's weights: full weights, or the base (given or loaded) with its adapter."""
    if method.name == "full":
        return load_base(cfg, MethodConfig(name="full"), path=weights, device_map=device_map)
    from peft import PeftModel

    if base is None:
        base = load_base(cfg, method, device_map=device_map)
    return PeftModel.from_pretrained(base, weights)


def inference_device_map() -> dict[str, int] | None:
    """Where evaluation and summarizing put a model: the first GPU when there is one (GPU only; on CPU the
    loaders' default)."""
    return {"": 0} if torch.cuda.is_available() else None


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters; peft counts 4-bit weights at their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:  # a full fine-tune: every weight is a plain tensor
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}


def merge(run_dir: Path, out: Path) -> Path:
    """Fold a LoRA adapter into a full-precision copy of its base and save it with the tokenizer."""
    from dsum import config as config_mod
    from dsum import rundir

    job = config_mod.load(run_dir / rundir.CONFIG)
    weights = rundir.RunDir(run_dir).final
    tokenizer = load_tokenizer(job.model, str(weights))
    adapter = job.method.name != "full"
    base = load_base(job.model, MethodConfig(name="full")) if adapter else None  # merging needs unquantized weights
    model = load_trained(job.model, job.method, str(weights), base)
    if adapter:
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _model_type(path: str, cfg: ModelConfig) -> str | None:
    """The checkpoint's model_type (its config.json), for `plain_linear_layers`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        ).model_type
    except Exception:  # from_pretrained below says what is wrong with the checkpoint
        return None


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)
