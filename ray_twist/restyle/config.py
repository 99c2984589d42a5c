"""Settings of a bulk restyling job (`jobs/restyle_corpus.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ray_twist.retrieval import InstanceRetrievalSettings
from ray_twist.settings import Settings

__all__ = ["RestyleCorpusConfig"]


class RestyleCorpusConfig(Settings):
    """jobs/restyle_corpus.py: restyle a corpus with Ray Data (see `ray_twist.restyle`).

    Give exactly one of `adapter` (mode "adapted": one PEFT adapter merged into the base
    model) or `pool` (modes "instance" / "mixture": every row its own retrieval-weighted
    merge of the pool's sources, as in serving; `retrieval` applies only here).
    """

    input: str = Field(description="Parquet / JSONL / text file or directory (URI)")
    output: str = Field(description="output URI: Parquet parts, _errors/, _summary.json")
    adapter: str | None = Field(default=None, description="PEFT adapter dir (adapted mode)")
    pool: str | None = Field(default=None, description="weight pool URI (instance/mixture)")
    mode: Literal["adapted", "instance", "mixture"] | None = Field(
        default=None, description="default: adapted with an adapter, instance with a pool"
    )
    base_model: str | None = Field(
        default=None, description="default: the adapter's base_model_name_or_path, or the pool's"
    )
    style: str | None = Field(
        default=None,
        description="adapted: the label written with each row [adapter dir name]; with a "
        "pool: a pool source whose style key is the task-level query [none: instance level only, "
        "λ applied as 0]",
    )
    retrieval: InstanceRetrievalSettings | None = Field(
        default=None, description="λ, τ, top-k and rank q (pool modes only) [defaults]"
    )
    input_format: Literal["parquet", "jsonl", "text"] | None = None
    text_column: str = "text"
    id_column: str = "id"
    max_input_tokens: int = Field(default=128, ge=2, description="longer rows go to _errors/")
    max_new_tokens: int = Field(default=32, ge=1)
    num_beams: int = Field(default=1, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    batch_size: int = Field(default=16, ge=1, description="rows per generate call")
    rows_per_part: int = Field(default=256, ge=1, description="rows per actor call / part file")
    min_workers: int = Field(default=1, ge=1)
    max_workers: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0.0, description="CPUs per actor")
    num_gpus: float | None = Field(
        default=None, ge=0.0, description="default: 1 if the cluster has GPUs"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    merge_budget_bytes: int = Field(
        default=256 << 20, ge=1,
        description="instance/mixture: bytes of per-row LoRA factors an actor builds at once "
        "(rows are merged in chunks that fit)",
    )  # fmt: skip
    read_range_bytes: int | None = Field(
        default=None, ge=1,
        description="JSONL/text: bytes per read task's range [about 256 ranges, 1-64 MiB each]",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_source_of_style(self) -> RestyleCorpusConfig:
        if (self.adapter is None) == (self.pool is None):
            raise ValueError(
                "give exactly one of adapter (adapted mode) or pool (instance/mixture)"
            )
        if self.min_workers > self.max_workers:
            raise ValueError("min_workers must not exceed max_workers")
        if self.retrieval is not None and self.pool is None:
            raise ValueError("retrieval settings apply only with a pool")
        return self
