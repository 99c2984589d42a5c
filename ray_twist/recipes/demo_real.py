"""`twist demo --real`: the real-text pipeline on a verse-aligned Bible corpus, offline.

A recipe over the public API, driven by the repo's real-text configs (`jobs/configs/`):

1. **corpus** — split the versions by book into text, pair and judge files
   (`bible_prepare.yaml`; `--corpus DIR` points at another copy of the corpus);
2. **base** — the MiniLM warm start trained to copy (`base_bible.yaml`): built once and
   cached, reused by every later run (this phase says how long a build takes when it runs);
3. **pool** — a small pool of Bible-style source LoRAs (`build_pool_bible_demo.yaml`, ~15 min
   on 2 cores; cached by content; the study's larger pool is `build_pool_bible.yaml`);
4. **adapt** — BBE → KJV, held out of the pool, from 1 % of its pairs: TWIST, uniform and
   scratch initialisations, as the real-text study adapts;
5. **evaluate** — each adapter and the identity output (the input copied) on held-out books;
6. **serve** — the Serve app over HTTP with the TWIST adapter, on three test verses.

`demo_real.json` in the workdir records the table, the samples and the phase times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["run_real_demo"]

TARGET = "kjv"
INITS = ("twist", "uniform", "scratch")
RECORD = "demo_real.json"


def _eval_row(name: str, report: Any) -> dict[str, Any]:
    return {"init": name, "n_test": report.n, "acc": report.acc, "bleu": report.bleu,
            "g": report.g, "bleu_lowercase": report.bleu_lowercase}  # fmt: skip


def run_real_demo(
    corpus: str | None = None,
    configs: str = "jobs/configs",
    fraction: float = 0.01,
    n_test: int = 60,
) -> dict[str, Any]:
    """Run every phase (see the module docstring), print as it goes; return the record."""
    import ray
    from transformers.utils import logging as transformers_logging

    from ray_twist.adapt import AdaptConfig, adapt
    from ray_twist.base import BaseBuildConfig, build_base
    from ray_twist.build import build_pool, summary_table
    from ray_twist.build.config import BuildPoolConfig
    from ray_twist.data import write_task_jsonl
    from ray_twist.data.aligned import AlignedCorpusSettings, PrepareAlignedConfig, prepare_aligned
    from ray_twist.data.readers import read_task
    from ray_twist.evaluate import StyleClassifier, TestSet, evaluate_adapter
    from ray_twist.evaluate.run import evaluate_outputs, read_style_data
    from ray_twist.recipes.demo import _Phases, _serve_round_trip
    from ray_twist.recipes.study.config import StudyConfig
    from ray_twist.settings import load_yaml

    console = Console(record=True)
    if not console.is_terminal:
        console.width = 140
    transformers_logging.disable_progress_bar()
    phase = _Phases(console, 6)
    study = load_yaml(Path(configs, "low_resource_bible.yaml"), StudyConfig)
    assert study.real is not None
    real = study.real

    with phase("corpus", "seven Bible versions split by book"):
        prepare = load_yaml(Path(configs, "bible_prepare.yaml"), PrepareAlignedConfig)
        fields = prepare.model_dump(exclude={"out"}) | ({"dir": corpus} if corpus else {})
        manifest = prepare_aligned(AlignedCorpusSettings.model_validate(fields), prepare.out)
        console.print(f"{prepare.out}: {len(manifest['counts'])} files")
    if not ray.is_initialized():
        ray.init(log_to_driver=False)

    with phase("base", "MiniLM warm-started as BERT2BERT, every weight trained to copy"):
        base_config = load_yaml(Path(configs, "base_bible.yaml"), BaseBuildConfig)
        if not Path(base_config.out, "base_record.json").is_file():
            console.print(
                f"the base is not built yet: building it ({base_config.steps} steps) took "
                "about 30 min on a 2-core machine; it is cached for every later run"
            )
        base = build_base(base_config)
        record = base.record
        console.print(
            f"base {base.path}: copy-BLEU {record['copy_bleu_lowercase']:.1f} on "
            f"{record['heldout_lines']} held-out lines ({record['steps']} steps, built in "
            f"{record['seconds']['total'] / 60:.0f} min{', reused' if base.reused else ''})"
        )

    with phase("pool", "Bible-style source LoRAs (Ray Train + DeepSpeed), keys on Ray Data"):
        pool_config = load_yaml(Path(configs, "build_pool_bible_demo.yaml"), BuildPoolConfig)
        pool_report = build_pool(pool_config, progress=False)
        console.print(summary_table(pool_report))

    target = read_task(real.train).sample(fraction=fraction, seed=0)
    test = TestSet.from_task(read_task(real.test).sample(n=n_test, seed=real.seed))
    with phase("adapt", f"BBE → KJV from {len(target)} pairs ({100 * fraction:g} %)"):
        remote_adapt: Any = ray.remote(num_cpus=1, max_retries=0)(adapt)
        workdir = Path(study.out).absolute().with_name("demo_real")
        adapt_settings = {
            "rank": study.rank,
            "retrieval": study.retrieval.model_dump(by_alias=True),
            "training": study.training.model_dump(),
            "deepspeed": study.deepspeed.model_dump(),
            "resources": study.resources.model_dump(),
            "storage_path": str(workdir / "train"),
        }
        refs = {
            init: remote_adapt.remote(
                target,
                str(workdir / "adapters" / init),
                AdaptConfig.model_validate({"init": init, **adapt_settings}),
                pool_report.pool,
            )
            for init in INITS
        }
        results = dict(zip(refs, ray.get(list(refs.values())), strict=True))
        weights = results["twist"].weights or {}
        top = sorted(weights.items(), key=lambda kv: -kv[1])[:3]
        console.print("twist retrieval: " + ", ".join(f"{k} {v:.2f}" for k, v in top))

    with phase("evaluate", f"{n_test} held-out verses; judge fitted on other books"):
        texts, labels = read_style_data(real.judge_data)
        keep, per_label = [], dict.fromkeys(labels, 0)
        for i, label in enumerate(labels):  # the first texts of each style, up to the cap
            if per_label[label] < real.judge_texts_per_style:
                keep.append(i)
                per_label[label] += 1
        judge = StyleClassifier.fit([texts[i] for i in keep], [labels[i] for i in keep])
        identity = evaluate_outputs(test, test.sources, TARGET, judge, lowercase=True)
        rows = [_eval_row("identity (input copied)", identity)]
        outputs: dict[str, list[str]] = {}
        for init, result in results.items():
            report = evaluate_adapter(result.adapter_dir, test, TARGET, judge)
            rows.append(_eval_row(init, report))
            outputs[init] = [e.output for e in report.examples]
        table = Table("init", "G", "style acc", "BLEU (lowercased)")
        for row in rows:
            table.add_row(row["init"], f"{row['g']:.1f}", f"{row['acc']:.1f}", f"{row['bleu']:.1f}")
        console.print(table)
        console.print(f"judge held-out accuracy: {judge.heldout_accuracy:.1f} % (7 versions)")
        samples = Table("input (BBE)", "reference (KJV)", *INITS)
        refs_text = test.targets or []
        for i in range(3):
            samples.add_row(test.sources[i], refs_text[i], *(outputs[init][i] for init in INITS))
        console.print(samples)

    with phase("serve", "the Serve app over HTTP with the TWIST adapter"):
        examples = write_task_jsonl(target, workdir / "target_examples.jsonl")
        served = _serve_round_trip(
            pool_report.pool, results["twist"].adapter_dir, examples, workdir / "served.json",
            console, texts=test.sources[:3], style=TARGET, modes=("adapted",),
        )  # fmt: skip

    record_out = {
        "eval": rows,
        "samples": [
            {
                "input": test.sources[i],
                "reference": refs_text[i],
                **{init: outputs[init][i] for init in INITS},
            }
            for i in range(5)
        ],  # fmt: skip
        "twist_weights": weights,
        "served": served,
        "base": {k: record[k] for k in ("copy_bleu_lowercase", "steps", "seconds")},
        "phases": phase.seconds,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RECORD).write_text(json.dumps(record_out, indent=2))
    console.rule(f"done in {sum(phase.seconds.values()):.0f} s; record: {workdir / RECORD}")
    for name, seconds in phase.seconds.items():
        console.print(f"  {name:<9} {seconds:7.1f} s")
    return record_out
