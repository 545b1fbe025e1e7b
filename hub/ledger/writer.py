"""Group commit for the hub's one writer: many ledger movements, one COMMIT, one fsync.

With synchronous=FULL every COMMIT waits for an fsync of the WAL, which caps single-movement
commits at a few thousand per second whatever the CPU. The Writer lifts that cap without
weakening it: callers hand it a function of the connection, a single task collects everything
queued (up to `max_batch`), runs the batch in ONE `BEGIN IMMEDIATE` transaction with each
function in its own SAVEPOINT, commits once, and only then resolves the callers' futures. So:

- an acknowledged result is durable: `await writer.run(fn)` returns after the COMMIT that
  stored fn's writes, never before;
- a function that raises (InsufficientFunds, IdempotencyConflict, a bug) rolls back only its
  own savepoint; its caller gets that exception, with its type, and the rest of the batch
  commits;
- if BEGIN or COMMIT fails, nothing of the batch is stored and every caller in it gets the
  error.

The COMMIT runs off the event loop: the batch's body runs on the loop from BEGIN to its last
savepoint with no await, then `Database.write_batch()` hands the COMMIT (the fsync) to the
commit thread, and the loop goes on serving (GET requests read the last durable state from a
read-only connection). Code elsewhere in the hub that calls `db.transaction()` directly (on
the loop thread) never joins the batch's transaction: it runs before the batch, or, when it
comes while the COMMIT is in flight, waits for the COMMIT to end first. For the same reason
`fn` must be plain synchronous code that neither awaits nor ends the transaction itself (no
COMMIT/ROLLBACK); a coroutine function is refused with TypeError.

Batching needs no timer: while one batch commits, whatever the hub queues forms the next
batch. When idle the writer task awaits an Event (no polling).

Supervision: if the writer task's loop dies of an exception (a bug: a caller's exception is
always its own), the calls of the batch in hand fail with BatchAborted, the failure is logged,
counted in `restarts`, and the loop starts again; the queue and later calls are served.

Cancellation: a caller cancelled before its batch starts is dropped and nothing of it runs. A
caller cancelled after its batch committed has had its effect stored; its idempotency key makes
a retry harmless.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sqlite3
import time
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hub.ledger.ledger import Ledger
from hub.ledger.money import Entry, TransferRequest
from hub.store.db import Database
from hub.tasks import supervise

log = logging.getLogger(__name__)

T = TypeVar("T")

# A generic function of the connection, or a transfer for Ledger.transfer_many.
_Item = tuple[Callable[[sqlite3.Connection], Any] | TransferRequest, "asyncio.Future[Any]"]


class WriterClosed(RuntimeError):
    """The writer is not running (not started, stopping, or stopped): nothing was done."""


class BatchAborted(RuntimeError):
    """The batch's transaction ended before its COMMIT: the call was not acknowledged.

    When SQLite rolled the transaction back itself (disk full, I/O error) nothing of the batch
    was stored; retrying with the same idempotency key is right in every case.
    """


@dataclass(frozen=True)
class WriterStats:
    batches: int  # committed batches
    calls: int  # functions run in committed batches (whether they raised or not)
    largest: int  # most functions in one batch
    restarts: int = 0  # times the writer task's loop died of an exception and was restarted

    @property
    def batch_mean(self) -> float:
        return self.calls / self.batches if self.batches else 0.0


class Writer:
    """The single task that writes through `db`, committing queued work in batches."""

    def __init__(self, db: Database, max_batch: int = 512, ledger: Ledger | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, not {max_batch!r}")
        if ledger is not None and ledger.db is not db:
            raise ValueError("the ledger must write through the writer's database")
        self.db = db
        self._ledger = ledger  # for transfer(); made on first use when not given
        self.max_batch = max_batch
        self._queue: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._batches = 0
        self._calls = 0
        self._largest = 0
        self.restarts = 0
        self._in_hand: list[_Item] = []  # the batch being committed
        # Told (writes, seconds from BEGIN to durable COMMIT) after each committed batch: the
        # app points it at its metrics (hub/api/metrics.py).
        self.on_commit: Callable[[int, float], None] | None = None

    @property
    def stats(self) -> WriterStats:
        return WriterStats(self._batches, self._calls, self._largest, self.restarts)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closing and not self._task.done()

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("this Writer was started already; create a new one")
        self._wakeup = asyncio.Event()
        self.db.start_checkpointer()  # checkpoints run beside the batches, not in a COMMIT
        self._task = asyncio.create_task(self._serve(), name="hub-writer")

    async def stop(self) -> None:
        """Stop accepting work, commit everything already queued, then end the task."""
        if self._task is None:
            return
        self._closing = True
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await self._task
        finally:
            self.db.stop_checkpointer()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) in the next batch; return its result once the batch is committed.

        fn's exception is re-raised here when fn fails (only fn's writes are undone); the
        COMMIT's exception when the batch could not be stored.
        """
        if not self.running:
            raise WriterClosed("the ledger writer is not running; the hub is starting or stopping")
        assert self._wakeup is not None
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((fn, fut))
        self._wakeup.set()
        return await fut

    async def transfer(
        self,
        idem_key: str,
        src: str,
        dst: str,
        amount: int,
        reason: str,
        memo: dict[str, Any] | None = None,
        same_memo: bool = False,
    ) -> Entry:
        """`Ledger.transfer` in the next batch; the Entry once the batch is committed.

        Same results and exceptions as `ledger.transfer(...)` run through `run()`, but
        consecutive queued transfers are applied together by `Ledger.transfer_many`, without
        a savepoint each: much less work per transfer.
        """
        if not self.running:
            raise WriterClosed("the ledger writer is not running; the hub is starting or stopping")
        if self._ledger is None:
            self._ledger = Ledger(self.db)  # migrations already applied: only checks them
        assert self._wakeup is not None
        fut: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        self._queue.append(
            (TransferRequest(idem_key, src, dst, amount, reason, memo, same_memo), fut)
        )
        self._wakeup.set()
        return await fut

    # --- the writer task ------------------------------------------------------------------
    async def _serve(self) -> None:
        """Run the batches; restart the loop when it dies of an exception (see the docstring)."""
        try:
            await supervise(self._drain, self._died)
        finally:
            # Reached normally only once drained; on cancellation nobody may be left waiting
            # for an answer that will never come.
            self._closing = True
            self._abort_in_hand(None)
            while self._queue:
                _, fut = self._queue.popleft()
                if not fut.done():
                    fut.set_exception(WriterClosed("the ledger writer stopped; nothing was done"))

    def _died(self, error: Exception) -> None:
        self.restarts += 1
        log.exception(
            "the ledger writer task failed; restarting it (%d restarts so far)", self.restarts
        )
        self._abort_in_hand(error)

    async def _drain(self) -> None:
        """Commit queued work batch by batch; return once closing and drained."""
        assert self._wakeup is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            n = min(len(self._queue), self.max_batch)
            self._in_hand = [self._queue.popleft() for _ in range(n)]
            await self._commit(self._in_hand)
            self._in_hand = []
            # Let the callers just acknowledged (and the rest of the hub) run; they queue
            # the next batch meanwhile. Without this a full queue would starve the loop.
            await asyncio.sleep(0)

    def _abort_in_hand(self, error: BaseException | None) -> None:
        batch, self._in_hand = self._in_hand, []
        why = f" ({type(error).__name__}: {error})" if error is not None else ""
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(
                    BatchAborted(
                        f"the ledger writer failed while committing this call{why}; it may or"
                        " may not be stored: retry with the same key"
                    )
                )

    async def _commit(self, batch: list[_Item]) -> None:
        """One transaction for the batch, its COMMIT off the loop; resolve the futures after
        the COMMIT. The body awaits nothing: only the COMMIT is awaited."""
        live = [(fn, fut) for fn, fut in batch if not fut.done()]  # done = cancelled
        if not live:
            return
        conn = self.db.conn
        outcomes: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        tx = self.db.write_batch()
        started = time.perf_counter()
        try:
            async with tx:
                i, n = 0, len(live)
                while i < n:
                    fn, fut = live[i]
                    if isinstance(fn, TransferRequest):
                        # A run of consecutive transfers: one set-based step, in queue order.
                        j = i + 1
                        while j < n and isinstance(live[j][0], TransferRequest):
                            j += 1
                        group = live[i:j]
                        i = j
                        self._transfer_group(group, outcomes)
                    else:
                        i += 1
                        try:
                            with self.db.transaction() as c:
                                result = fn(c)
                                if _is_awaitable(result):
                                    _discard(result)
                                    raise TypeError(
                                        "Writer.run() takes a synchronous function of the"
                                        " connection; it got one returning an awaitable"
                                    )
                        except Exception as e:
                            outcomes.append((fut, e, None))
                        else:
                            outcomes.append((fut, None, result))
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (disk full, I/O error) or
                        # fn ended it itself. Running on would autocommit later functions
                        # one by one, outside the batch: stop, and fail the whole batch.
                        error = outcomes[-1][1]
                        raise BatchAborted(
                            "the write transaction ended before the batch's COMMIT"
                            + (f" ({type(error).__name__}: {error})" if error else "")
                            + "; the movement was not acknowledged: retry with the same key"
                        )
        except Exception as e:  # BEGIN, COMMIT or the batch itself failed: nothing stored
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return
        except BaseException as e:  # cancelled, KeyboardInterrupt, SystemExit...: re-raise
            if tx.committed:  # cancelled while the COMMIT ran; write_batch saw it through
                self._resolve(live, outcomes)
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(BatchAborted(f"the writer was interrupted: {e!r}"))
            raise
        self._resolve(live, outcomes)
        if self.on_commit is not None:
            self.on_commit(len(live), time.perf_counter() - started)

    def _resolve(
        self,
        live: list[_Item],
        outcomes: list[tuple[asyncio.Future[Any], BaseException | None, Any]],
    ) -> None:
        """After the COMMIT: count the batch and answer its callers."""
        self._batches += 1
        self._calls += len(live)
        self._largest = max(self._largest, len(live))
        for fut, error, result in outcomes:
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def _transfer_group(
        self,
        group: list[_Item],
        outcomes: list[tuple[asyncio.Future[Any], BaseException | None, Any]],
    ) -> None:
        """Apply consecutive transfers with Ledger.transfer_many; one outcome per transfer.

        transfer_many works inside its own savepoint: if it fails as a whole (a database
        error), nothing of the group is kept and each of its callers gets that error.
        """
        assert self._ledger is not None
        requests: list[TransferRequest] = []
        for req, _ in group:
            assert isinstance(req, TransferRequest)
            requests.append(req)
        try:
            results = self._ledger.transfer_many(requests)
        except Exception as e:
            outcomes.extend((fut, e, None) for _, fut in group)
            return
        for (_, fut), result in zip(group, results, strict=True):
            if isinstance(result, Exception):
                outcomes.append((fut, result, None))
            else:
                outcomes.append((fut, None, result))


def _is_awaitable(value: object) -> bool:
    """inspect.isawaitable without its slow isinstance(..., Awaitable), run once per call."""
    return hasattr(type(value), "__await__") or (
        isinstance(value, types.GeneratorType) and inspect.isawaitable(value)
    )


def _discard(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):  # a coroutine never awaited would warn at garbage collection
        close()
