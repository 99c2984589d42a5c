"""The `twist serve` config (also the `args:` of an application in a Serve config file).

One model for both entry points, so `twist serve --config FILE` and `serve deploy
cluster/serve.yaml` accept the same keys. Every model forbids unknown keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ray_twist.backbone import AllowUntrainedBase
from ray_twist.merge import MERGE_ORDERS, MergeOrder
from ray_twist.pool import validate_name
from ray_twist.retrieval import InstanceRetrievalSettings
from ray_twist.settings import ConfigError, Settings


class StyleSettings(Settings):
    """A registered target style: a PEFT adapter, optionally with examples for retrieval."""

    adapter: str = Field(description="PEFT adapter dir or URI (local, file://, s3://, gs://)")
    examples: str | None = Field(
        default=None,
        description="the style's examples (source/target pairs, as `twist init --target`); "
        "their style key becomes the task-level query in instance and mixture modes",
    )


class LimitSettings(Settings):
    """What one request may ask for; anything beyond is a 4xx naming the field."""

    max_texts: int = Field(default=32, ge=1)
    max_text_chars: int = Field(default=4000, ge=1)
    max_input_tokens: int = Field(default=128, ge=2)
    default_max_new_tokens: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=128, ge=1)
    max_num_beams: int = Field(default=4, ge=1)
    max_temperature: float = Field(default=10.0, gt=0.0)
    max_body_bytes: int = Field(default=1 << 20, ge=64)
    request_timeout_s: float = Field(default=60.0, gt=0.0, description="504 after this long")
    max_rank: int = Field(
        default=16, ge=1, description="the highest merge rank a request may ask for (`twist.rank`)"
    )
    min_tau: float = Field(
        default=0.01, gt=0.0, description="the lowest softmax temperature a request may ask for"
    )
    merge_orders: list[MergeOrder] = Field(
        default_factory=lambda: list(MERGE_ORDERS),
        min_length=1,
        description="merge orders an instance-mode request may ask for (`merge_order`); each "
        "is prepared when a replica starts (truncate_then_sum: every source's top-q SVD)",
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> LimitSettings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        return self


class BatchSettings(Settings):
    """Dynamic batching on each generator replica (`@serve.batch`), counted in texts."""

    max_batch_rows: int = Field(default=32, ge=1, description="texts per forward pass")
    batch_wait_timeout_s: float = Field(default=0.01, ge=0.0)


class AutoscalingSettings(Settings):
    """Ray Serve autoscaling: replicas follow ongoing requests per replica."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0.0)
    upscale_delay_s: float = Field(default=10.0, ge=0.0)
    downscale_delay_s: float = Field(default=300.0, ge=0.0)
    look_back_period_s: float = Field(
        default=30.0, gt=0.0, description="the window ongoing requests are averaged over"
    )
    metrics_interval_s: float = Field(
        default=10.0,
        gt=0.0,
        description="how often handles and replicas report their load to the controller "
        "(deprecated by Ray in favour of environment variables, but in Ray 2.60 still the "
        "setting the handles use)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must exceed metrics_interval_s")
        return self


class DeploymentSettings(Settings):
    """Replicas and resources of one deployment; `num_replicas` set disables autoscaling."""

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float | Literal["auto"] = Field(
        default=0.0, description='GPUs per replica; "auto" = 1 when the cluster has GPUs'
    )
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=-1, ge=-1, description="-1 = unbounded; else 503")
    health_check_period_s: float = Field(default=10.0, gt=0.0)
    health_check_timeout_s: float = Field(default=30.0, gt=0.0)

    @field_validator("num_gpus")
    @classmethod
    def _non_negative(cls, value: float | str) -> float | str:
        if isinstance(value, float | int) and value < 0:
            raise ValueError("num_gpus must be >= 0 or 'auto'")
        return value

    def options(self, cluster_gpus: float) -> dict[str, Any]:
        """`Deployment.options(...)` keyword arguments."""
        gpus = (1.0 if cluster_gpus >= 1 else 0.0) if self.num_gpus == "auto" else self.num_gpus
        scaling: dict[str, Any]
        if self.num_replicas is not None:
            scaling = {"num_replicas": self.num_replicas}
        else:
            scaling = {"autoscaling_config": self.autoscaling.model_dump()}
        return {
            **scaling,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            # a stopping replica polls for its last requests this often (Serve: every 2 s,
            # so an idle app took 2 s to undeploy, a share of `twist serve`'s 10 s to stop)
            "graceful_shutdown_wait_loop_s": 0.2,
        }


class IngressSettings(DeploymentSettings):
    """The HTTP front: light (parsing, validation, routing), so a fraction of a CPU."""

    num_cpus: float = Field(default=0.25, ge=0.0)
    max_ongoing_requests: int = Field(default=256, ge=1)


class GeneratorSettings(DeploymentSettings):
    """The model replicas: base model, pool factors and an LRU cache of named adapters."""

    num_gpus: float | Literal["auto"] = "auto"
    max_adapters_per_replica: int = Field(default=16, ge=1, description="LRU adapter cache size")


class AuthSettings(Settings):
    """Optional bearer API keys. With either source set, every route but /healthz and the
    API docs needs `Authorization: Bearer <key>`; keys are read when an ingress replica
    starts (so a changed file takes effect on a redeploy) and never logged."""

    api_keys_file: str | None = Field(
        default=None,
        description="local file on the ingress hosts: one key per line (blank lines and "
        "lines starting with # are skipped)",
    )
    api_keys_env: str | None = Field(
        default=None,
        description="environment variable of the ingress replicas holding keys, separated "
        "by commas or whitespace",
    )

    @property
    def enabled(self) -> bool:
        return self.api_keys_file is not None or self.api_keys_env is not None

    def api_keys(self) -> list[str]:
        """The keys from the file and the variable; a source that is set but missing or
        empty is a ConfigError naming it (a server meant to be private must not start open)."""
        keys: list[str] = []
        if self.api_keys_file is not None:
            try:
                lines = Path(self.api_keys_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(
                    f"auth.api_keys_file {self.api_keys_file}: {exc.strerror}"
                ) from None
            found = [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
            if not found:
                raise ConfigError(f"auth.api_keys_file {self.api_keys_file} holds no key")
            keys += found
        if self.api_keys_env is not None:
            found = re.split(r"[\s,]+", os.environ.get(self.api_keys_env, "").strip())
            if found == [""]:
                raise ConfigError(f"auth.api_keys_env: ${self.api_keys_env} is unset or empty")
            keys += found
        return keys


class HttpSettings(Settings):
    """Where `twist serve` listens (a Serve config file sets its own http_options)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)


class ServeConfig(Settings):
    """Everything `twist serve` needs; `pool` or `base_model` must be given."""

    name: str = Field(default="twist", description="Serve application name")
    route_prefix: str = "/"
    pool: str | None = Field(default=None, description="weight pool URI (instance/mixture)")
    base_model: str | None = Field(default=None, description="HF name or path; default: pool's")
    featurizer: str | None = Field(default=None, description="default: the pool's featurizer")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    styles: dict[str, StyleSettings] = Field(default_factory=dict)
    retrieval: InstanceRetrievalSettings = InstanceRetrievalSettings()
    limits: LimitSettings = LimitSettings()
    batching: BatchSettings = BatchSettings()
    ingress: IngressSettings = IngressSettings()
    generator: GeneratorSettings = GeneratorSettings()
    http: HttpSettings = HttpSettings()
    auth: AuthSettings = AuthSettings()
    allow_untrained_base: AllowUntrainedBase = False

    @field_validator("styles", mode="before")
    @classmethod
    def _adapter_shorthand(cls, styles: Any) -> Any:
        """`name: DIR` is short for `name: {adapter: DIR}`."""
        if isinstance(styles, dict):
            return {k: {"adapter": v} if isinstance(v, str) else v for k, v in styles.items()}
        return styles

    @field_validator("styles")
    @classmethod
    def _style_names(cls, styles: dict[str, StyleSettings]) -> dict[str, StyleSettings]:
        for name in styles:
            validate_name(name, "style name")
        return styles

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.pool is None and self.base_model is None:
            raise ValueError("give a pool, a base_model, or both")
        if self.retrieval.merge_order not in self.limits.merge_orders:
            raise ValueError(
                f"retrieval.merge_order {self.retrieval.merge_order} is not in "
                f"limits.merge_orders {self.limits.merge_orders}"
            )
        if self.pool is None and not self.styles:
            raise ValueError("without a pool, register at least one style (styles: {name: DIR})")
        if self.batching.max_batch_rows < self.limits.max_texts:
            raise ValueError(
                "batching.max_batch_rows must be >= limits.max_texts (one request is one batch "
                "item and must fit in a batch)"
            )
        return self
