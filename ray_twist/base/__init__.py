"""Real-text base models: `twist base build` warm-starts an encoder-decoder from a
BERT-family encoder and trains every weight to copy text, offline, on Ray Train + DeepSpeed.

    config       BaseBuildConfig: encoder, texts, steps, noise, resources
    warm_start   the BERT2BERT warm start, its vocabulary trimmed to the texts
    build        read texts (Ray Data), train (the sources' loop), score copy-BLEU, record
"""

from ray_twist.base.build import RECORD_FILE, BaseBuildResult, build_base, build_key
from ray_twist.base.config import BaseBuildConfig, CopyNoiseSettings

__all__ = [
    "RECORD_FILE",
    "BaseBuildConfig",
    "BaseBuildResult",
    "CopyNoiseSettings",
    "build_base",
    "build_key",
]
