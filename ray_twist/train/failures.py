"""Which training failures are worth a retry.

Ray Train restarts a failed worker group from its latest checkpoint (`FailureConfig`), which
is right for a killed worker mid-training and wrong for an error every attempt hits again:
a base model that does not load, a LoRA that does not wrap, an adapter that cannot be saved.
The worker loop runs those setup steps inside `setup_phase()`, which turns an error into a
`SetupError`; the `fail_fast_callback()` on the controller sees it among the worker errors
and ends the run at once (a controller error, which the failure policy does not retry), and
`train_lora` re-raises the original exception. Nothing here imports Ray at module level.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

__all__ = ["SetupError", "fail_fast_callback", "find_setup_error", "setup_phase"]

#: Errors that may pass on a retry (a network blip while reading the base model).
_TRANSIENT = (ConnectionError, TimeoutError)


class SetupError(RuntimeError):
    """A training worker failed before its first step: deterministic, so not retried.

    `original` is the exception the worker raised (None when it cannot be pickled); the
    message is `<type>: <message>` of that exception.
    """

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        super().__init__(message)
        self.original = original

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.original))

    @classmethod
    def wrap(cls, exc: BaseException) -> SetupError:
        original: BaseException | None = exc
        try:  # only a probe: does it serialise to travel back to the driver?
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an unpicklable error travels as its message
            original = None
        return cls(f"{type(exc).__name__}: {exc}", original)

    def unwrap(self) -> BaseException:
        """The worker's own exception where it travelled, else this one."""
        return self.original if self.original is not None else self


@contextlib.contextmanager
def setup_phase() -> Iterator[None]:
    """Run a worker's setup steps: their errors (but transient ones) become `SetupError`."""
    try:
        yield
    except _TRANSIENT:
        raise
    except SetupError:
        raise
    except Exception as exc:
        raise SetupError.wrap(exc) from exc


def find_setup_error(exc: BaseException | None, depth: int = 6) -> SetupError | None:
    """The `SetupError` in an exception as Ray hands it over (wrapped with the worker's
    traceback, or as a cause), if any."""
    seen = 0
    while exc is not None and seen < depth:
        if isinstance(exc, SetupError):
            return exc
        # Ray Train V2 hands a worker's exception over wrapped in its
        # `UserExceptionWithTraceback`, which keeps it only as `_base_exc`: no public
        # accessor, cause or `__reduce__`-free way reaches it (Ray 2.60). The worker errors
        # given to `UserCallback.after_exception` are already unwrapped; the exceptions the
        # driver's `fit()` raises are not, so this duck-typed read stays (and is harmless
        # where the attribute is absent).
        inner = getattr(exc, "_base_exc", None)
        if not isinstance(inner, BaseException):
            inner = getattr(exc, "cause", None) or exc.__cause__
        exc = inner if isinstance(inner, BaseException) else None
        seen += 1
    return None


def fail_fast_callback() -> Any:
    """A `ray.train.UserCallback` that ends the run when a worker fails in setup."""
    from ray_twist.train._fail_fast import FailFastOnSetupError

    return FailFastOnSetupError()
