"""Check: source LoRA training steps with DeepSpeed on CUDA (ZeRO-2, bf16), one process.

    python bench/deepspeed_cuda.py [--steps 60] [--zero 2] [--precision bf16]

Uses the training loop's own components (`wrap_lora`, `tokenize_pairs`, `deepspeed_config`)
on a t5-small-shaped model built from a config, fed with synthetic-world pairs. It runs
outside Ray Train because the GPU machine this was checked on has no Ray (the Ray wheel is
too large to carry there); on a cluster `train_lora` runs the same engine under Ray Train.
No in-run anchor: DeepSpeed fixes its accelerator once per process. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
from common import write_result
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config

from ray_twist.backbone import packaged_minilm_path
from ray_twist.data import make_task
from ray_twist.train import deepspeed_config, tokenize_pairs, wrap_lora
from ray_twist.train.config import DeepSpeedSettings, LoraSettings, TrainingSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    device: str, steps: int, batch: int, settings: DeepSpeedSettings, tokenizer_dir: str
) -> dict:
    import deepspeed

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = wrap_lora(AutoModelForSeq2SeqLM.from_config(config), "seq2seq", LoraSettings(r=16))
    training = TrainingSettings(batch_size=batch, lr=1e-3)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(settings, training, 1, on_gpu=device == "cuda"),
    )
    task = make_task("pirate", steps * batch, seed=0)
    losses, start = [], 0.0
    for step in range(steps):
        lo = step * batch
        inputs = tokenize_pairs(tokenizer, "seq2seq", task.sources[lo : lo + batch],
                                task.targets[lo : lo + batch], 64, 64)  # fmt: skip
        inputs = {k: v.to(engine.device) for k, v in inputs.items()}
        if step == 5:  # warm-up excluded from the rate
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"device": device, "engine": type(engine).__name__,
            "zero_stage": int(engine.zero_optimization_stage()),
            "optimizer": type(engine.optimizer).__name__, "precision": settings.precision,
            "steps": steps, "batch": batch, "samples_per_s": (steps - 5) * batch / seconds,
            "loss_first": losses[0], "loss_last": sum(losses[-5:]) / 5}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir [packaged MiniLM]")
    parser.add_argument("--out", default="bench/results/deepspeed_cuda.json")
    args = parser.parse_args()
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    gpu = DeepSpeedSettings(zero_stage=args.zero, precision=args.precision)
    tokenizer = args.tokenizer or packaged_minilm_path()
    runs = (
        [run("cuda", args.steps, args.batch, gpu, tokenizer)] if torch.cuda.is_available() else []
    )
    print(f"\n{'device':<7}{'engine':<18}{'ZeRO':>5}{'prec':>6}{'samples/s':>11}"
          f"{'loss first':>11}{'loss last':>10}")  # fmt: skip
    for r in runs:
        print(f"{r['device']:<7}{r['engine']:<18}{r['zero_stage']:>5}{r['precision']:>6}"
              f"{r['samples_per_s']:>11.1f}{r['loss_first']:>11.3f}{r['loss_last']:>10.3f}")  # fmt: skip
    write_result(args.out, {"runs": runs})


if __name__ == "__main__":
    main()
