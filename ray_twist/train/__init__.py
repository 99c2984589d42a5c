"""LoRA training on Ray Train + DeepSpeed: source LoRAs for the pool, and target adaptation.

One training run is one `TorchTrainer.fit()`: every worker loads the frozen base model,
wraps it with a PEFT LoRA, and trains it under a DeepSpeed engine (ZeRO stage, precision
and optimizer offload from `DeepSpeedSettings`) on its shard of a Ray Data dataset. Ray
Train owns the process group (gloo on CPU, nccl on GPU); DeepSpeed reuses it.

    tokens             (source, target) pairs → model inputs with masked labels
    lora               wrap a base with a PEFT LoRA; save and load adapters
    deepspeed_config   the DeepSpeed config and process group
    loop               the per-worker training loop, its checkpoints and resume
    runs               the driver: `train_lora` (one run), `train_many` (concurrent runs),
                       `train_model` (every weight of a base model, no LoRA)

Importing this package (or its tokens, lora and deepspeed_config parts) does not import
Ray: the CUDA bench uses them on a machine without it.
"""

from ray_twist.train.deepspeed_config import deepspeed_config
from ray_twist.train.loop import ADAPTER_DIR as ADAPTER_DIR
from ray_twist.train.loop import DS_DIR as DS_DIR
from ray_twist.train.loop import DS_TAG as DS_TAG
from ray_twist.train.loop import STATE_FILE as STATE_FILE
from ray_twist.train.loop import train_loop_per_worker
from ray_twist.train.lora import wrap_lora
from ray_twist.train.runs import TrainManyError, TrainResult, train_lora, train_many, train_model
from ray_twist.train.tokens import IGNORE_INDEX as IGNORE_INDEX
from ray_twist.train.tokens import tokenize_pairs

__all__ = [
    "TrainResult",
    "TrainManyError",
    "deepspeed_config",
    "tokenize_pairs",
    "train_lora",
    "train_loop_per_worker",
    "train_many",
    "train_model",
    "wrap_lora",
]
