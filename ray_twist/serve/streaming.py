"""Token streaming for a request whose rows decode inside a shared batch.

A streamed request's `Work` carries a `TextStream` (a `ray_twist.generation.TokenWatch`):
the batch's decoding thread hands it every row's new token after each step, and it turns
them into text deltas on the replica's event loop. The rows decode in the same forward passes
as every other request of their batch, so a streamed row's text equals the row's text sent
unstreamed. A consumer that leaves (`cancel`) stops its rows at the next step, and a work
whose stream was cancelled before its pass is dropped from it: the batch slot is freed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from ray_twist.generation import detokenise

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Delta:
    """New text of one row of the request."""

    row: int
    text: str


class TextStream:
    """One streamed request's rows: tokens in (decoding thread), text deltas out (event loop);
    with `decode` False it only follows the rows (each one's finish reason, a caller that left).

    A row's text so far is sent only while it extends what was sent (a partly decoded
    multi-byte character is held back); the rest comes with the final text (`tail`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        rows: int,
        max_new_tokens: int,
        eos_ids: Sequence[int],
        loop: asyncio.AbstractEventLoop,
        decode: bool = True,
    ) -> None:
        self.tokenizer, self.max_new_tokens, self.eos = tokenizer, max_new_tokens, set(eos_ids)
        self.loop, self.decode = loop, decode  # decode False: count tokens, send no deltas
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.ended = [False] * rows  # eos seen, or stopped after a cancel
        self.sent = [""] * rows
        self.stopped_early = 0  # rows a cancel stopped before they ended
        self.finished = False  # the request's pass is over
        self._cancelled = threading.Event()
        self._queue: asyncio.Queue[list[Delta] | None] = asyncio.Queue()

    # ---------------------------------------------------------- decoding thread (TokenWatch)

    def step(self, start: int, tokens: list[int]) -> None:
        deltas = []
        for row, token in enumerate(tokens, start):
            if self.ended[row]:
                continue
            if token in self.eos:
                self.ended[row] = True
                continue
            self.ids[row].append(token)
            if not self.decode:
                continue
            [text] = detokenise(self.tokenizer, [self.ids[row]])  # type: ignore[arg-type]
            sent = self.sent[row]
            if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                deltas.append(Delta(row, text[len(sent) :]))
                self.sent[row] = text
        if deltas:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, deltas)

    def stopped(self, start: int, count: int) -> list[bool]:
        if not self._cancelled.is_set():
            return [False] * count
        for row in range(start, start + count):
            if not self.ended[row]:
                self.ended[row] = True
                self.stopped_early += 1
        return [True] * count

    # ---------------------------------------------------------- event loop

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The consumer left: stop decoding these rows (at the next step)."""
        self._cancelled.set()

    def finish(self) -> None:
        """The request's pass is over (its response is set): end `deltas`."""
        self.finished = True
        self._queue.put_nowait(None)

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """Deltas as the rows decode, until `finish`."""
        while (batch := await self._queue.get()) is not None:
            yield batch

    def tail(self, row: int, final: str) -> str:
        """What the final text adds to what was sent (the final text is the unstreamed
        output, which extends what was sent for every tokenizer the project ships)."""
        return final[len(self.sent[row]) :] if final.startswith(self.sent[row]) else ""

    def finish_reason(self, row: int) -> FinishReason:
        """ "stop" when the row ended with its end-of-sequence token, else "length"."""
        return "stop" if self.ended[row] and len(self.ids[row]) < self.max_new_tokens else "length"
