"""The Ray Train side of `ray_twist.train.failures` (imports Ray; loaded only by the driver)."""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from ray_twist.train.failures import find_setup_error


class FailFastOnSetupError(UserCallback):
    """On the controller: a worker's `SetupError` ends the run instead of a restart.

    Raising from a callback makes the controller fail with a `ControllerError` carrying this
    exception, which Ray Train's failure policy never retries; the driver unwraps it.
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for exc in worker_exceptions.values():
            setup = find_setup_error(exc)
            if setup is not None:
                raise setup
