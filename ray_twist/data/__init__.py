"""Task corpora: the Task type, readers, denoising pairs, and the synthetic style world."""

from ray_twist.data.task import Task

__all__ = ["Task"]
