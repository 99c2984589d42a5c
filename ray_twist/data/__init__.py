"""Task corpora: the Task type, readers, denoising pairs, the synthetic style world, and
verse-aligned multi-version corpora (`prepare_aligned`)."""

from ray_twist.data.aligned import AlignedCorpusSettings, prepare_aligned
from ray_twist.data.denoise import corrupt, denoising_task
from ray_twist.data.readers import (
    DataError,
    read_corpus,
    read_paired_text,
    read_records,
    read_task,
    read_texts,
)
from ray_twist.data.synthetic import (
    STYLES,
    Style,
    apply_style,
    check_style,
    families,
    make_task,
    make_world,
    neutral_sentences,
    style_corpus,
    write_task_jsonl,
)
from ray_twist.data.task import Task

__all__ = [
    "STYLES",
    "AlignedCorpusSettings",
    "DataError",
    "Style",
    "Task",
    "apply_style",
    "check_style",
    "corrupt",
    "denoising_task",
    "families",
    "make_task",
    "make_world",
    "neutral_sentences",
    "prepare_aligned",
    "read_corpus",
    "read_paired_text",
    "read_records",
    "read_task",
    "read_texts",
    "style_corpus",
    "write_task_jsonl",
]
