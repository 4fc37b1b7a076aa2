"""Dynamic micro-batching with no hand-off: the request thread that finds the model free runs it.

A request's texts are tokenized in its own thread and queued one text at a time. A request that
finds a model slot free (at most `workers` runs at once) runs the queue's next batch itself, so a
lone request never waits for another thread. A batch is one session.run: the most urgent text and
the queued texts that pad well with it. When a run ends, the slot passes to the thread of the next
batch's most urgent text; requests whose texts ran in someone else's batch are woken when their
last text is done. Under load, a slot that comes free beside a running one first waits briefly
for the requests already on their way (see Scheduler._gather), so runs carry several texts.

The express slot: while every slot runs a batch with a long text (over EXPRESS_TOKENS), one more
run may start beside them, of short texts only. A short request then never waits for a long run to
end, and it costs nothing when no long text is in progress (the slot stays unused).

Urgency: a text's deadline is its arrival plus OVERTAKE times its expected run time, and the earliest
deadline goes first. Among texts of one length that is first come, first served; a short text may
overtake long ones that arrived shortly before it, so a flood of long texts cannot hold up short
requests, while a long text waits at most OVERTAKE times its own run time for texts that came later.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify
from tokenizers import Encoding

from service import state
from service.classifier import Classifier, InferenceError, Input, Prediction
from service.metrics import Metrics
from service.timing import Timing

logger = logging.getLogger(__name__)

# The fixed cost of one session.run, in padded tokens' worth of time (a run costs a fixed part plus a
# part per padded token; bench.inprocess measures both). Length groups merge while the padding this
# adds costs less than a run of its own.
RUN_COST_TOKENS = 20
OVERTAKE = 8.0  # how many of its own run times a text may wait for more urgent texts that came later
_SECONDS_PER_TOKEN = 0.0005  # first estimate of a run's time per padded token, refined by every run
_POLL = 1.0  # seconds a waiting request sleeps at most before it looks at its job again
# A text of more tokens makes its run long; the express slot runs only texts of at most as many.
EXPRESS_TOKENS = 64


class Unavailable(Exception):
    """The request cannot be taken now (queue full, queue timeout, shutting down): 503, retry later."""

    def __init__(self, message: str, retry_after: int, reason: str) -> None:
        """Store the client message, the Retry-After seconds and the metrics reason."""
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.reason = reason


@dataclass(eq=False)
class Job:
    """One request's encoded inputs on their way through the queue, and their logits as they come."""

    encodings: Sequence[Encoding]
    labels: int
    per_token: bool = False  # logits per token: a list of [tokens, labels] arrays, one per text
    enqueued: float = field(default_factory=time.monotonic)
    taken: int = 0  # texts a batch has taken
    queued_tokens: int = 0  # tokens of its texts still in the queue
    left: int = 0  # texts without logits yet
    logits: np.ndarray | list[np.ndarray] = field(init=False)
    error: BaseException | None = None
    cancelled: bool = False  # gave up or failed: its queued texts are skipped
    # batches this job's thread must run next: with several slots, more than one can be handed to it
    lead: list[tuple[list[Item], bool]] = field(default_factory=list)  # (batch, in the express slot)
    wake: threading.Event = field(default_factory=threading.Event)
    timing: Timing | None = None  # the request's stages: queue wait and model runs are recorded here

    def __post_init__(self) -> None:
        """Make room for the logits."""
        self.left = len(self.encodings)
        self.queued_tokens = sum(len(encoding) for encoding in self.encodings)
        self.logits = ([np.empty(0, dtype=np.float32)] * len(self.encodings) if self.per_token
                       else np.empty((len(self.encodings), self.labels), dtype=np.float32))

    @property
    def done(self) -> bool:
        """Return whether every text has logits or the job failed."""
        return self.left == 0 or self.error is not None


@dataclass(order=True)
class Item:
    """One queued text: ordered by deadline, then arrival."""

    deadline: float
    order: int
    job: Job = field(compare=False)
    index: int = field(compare=False)

    @property
    def tokens(self) -> int:
        """Return the text's length in tokens."""
        return len(self.job.encodings[self.index])


def length_groups(lengths: Sequence[int], max_tokens: int, max_texts: int,
                  run_cost: int = RUN_COST_TOKENS) -> list[list[int]]:
    """Split texts (by index) into runs with the least padded tokens + run_cost per run."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    # best[j]: least cost of the j shortest texts; cut[j]: where their last run starts. Sorted by
    # length, an optimal split uses contiguous runs, so this O(n^2) dynamic programme is exact.
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end - 1, -1, -1):
            size = end - start
            if size > max_texts or (size > 1 and size * longest > max_tokens):
                break
            cost = best[start] + size * longest + run_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class Scheduler:
    """A bounded queue of texts and `workers` model slots, run by the request threads themselves."""

    def __init__(self, classifier: Classifier, *, max_texts: int, max_tokens: int, max_queue: int,
                 queue_timeout: float, wait: float = 0.0, gather: float = 0.0, workers: int = 1,
                 express: bool = False, metrics: Metrics | None = None) -> None:
        """Configure the limits; start() opens the model slots (and the express slot, with `express`)."""
        self.classifier = classifier
        self.max_texts, self.max_tokens, self.max_queue = max_texts, max_tokens, max_queue
        self.queue_timeout, self.wait, self.gather, self.workers = queue_timeout, wait, gather, workers
        self.metrics = metrics
        self._heap: list[Item] = []
        self._order = itertools.count()
        self._pending = 0  # texts queued and not yet taken by a batch
        self._pending_tokens = 0
        self._free = 0  # model slots nobody holds; none until start()
        self.express = express
        self._express_free = False  # the express slot, once started, while nobody holds it
        self._long_runs = 0  # runs in progress in the regular slots with a text over EXPRESS_TOKENS
        self._started = self._stopping = False
        self._seconds_per_token = _SECONDS_PER_TOKEN
        self._cond = threading.Condition()
        self._arriving = 0  # requests between arrival and queueing their texts (see arrive())
        self._local = threading.local()
        if metrics is not None:
            metrics.track_queue(lambda: self._pending)

    @property
    def depth(self) -> int:
        """Return the texts waiting in the queue."""
        return self._pending

    @property
    def arriving(self) -> int:
        """Return the requests counted as on their way to the queue."""
        return self._arriving

    @property
    def alive(self) -> bool:
        """Return whether batches are being run: started and not stopped."""
        return self._started and not self._stopping

    def start(self) -> None:
        """Open the model slots; what is already queued starts at once."""
        with self._cond:
            self._started = True
            self._free = self.workers
            self._express_free = self.express
            while self._free and self._heap:
                self._free -= 1
                self._hand_over(self._take())
            self._start_express()

    def warmup(self) -> None:
        """Run the classifier's warm-up batches through the queue."""
        for texts in self.classifier.warmup_batches():
            self.logits(self.classifier.encode(texts))

    def stop(self, timeout: float) -> bool:
        """Refuse new requests, let queued ones finish; return whether they did within timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            while self._pending or (self._started and (self._free < self.workers
                                                        or self._express_free != self.express)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def classify(self, inputs: Sequence[Input], top_k: int | None = None,
                 function_to_apply: str | None = None) -> list[list[Prediction]]:
        """Tokenize inputs here, run them in a batch and post-process them here."""
        logits = self.logits(self.classifier.encode(inputs))
        return self.classifier.postprocess(logits, top_k, function_to_apply)

    def arrive(self) -> None:
        """Count this thread's request as on its way to the queue, until it queues texts or depart()s."""
        with self._cond:
            self._arriving += 1
        self._local.arriving = True

    def depart(self) -> None:
        """End this thread's arrival if its request never queued texts (errors, other routes)."""
        if getattr(self._local, "arriving", False):
            with self._cond:
                self._arrived()
                self._cond.notify_all()

    def _arrived(self) -> None:
        """Stop counting this thread's request as on its way (called with the lock held)."""
        if getattr(self._local, "arriving", False):
            self._local.arriving = False
            self._arriving -= 1

    def logits(self, encodings: Sequence[Encoding], timing: Timing | None = None) -> np.ndarray | list[np.ndarray]:
        """Return the logits [texts, labels] of encoded inputs, batched with concurrent requests; for a
        per-token task, each text's [tokens, labels]."""
        job = Job(encodings, len(self.classifier.labels), self.classifier.task.per_token, timing=timing)
        if timing is not None:
            timing.enqueued = time.perf_counter()
        with self._cond:
            self._arrived()
            if self._stopping:
                raise self._unavailable("the service is shutting down", "shutting_down")
            if self._pending + len(encodings) > self.max_queue:
                raise self._unavailable("overloaded: the queue is full, retry later", "queue_full")
            for index, encoding in enumerate(encodings):
                expected = (len(encoding) + RUN_COST_TOKENS) * self._seconds_per_token
                heapq.heappush(self._heap, Item(job.enqueued + OVERTAKE * expected, next(self._order),
                                                job, index))
            self._pending += len(encodings)
            self._pending_tokens += job.queued_tokens
            self._queue_changed()
            self._cond.notify_all()  # a slot holder gathering a batch counts the texts
            batch, express = None, False
            if self._free:  # then nothing else is queued: run now, in this thread
                self._free -= 1
                self._gather()
                batch = self._take()
            elif self._express_open() and self._short(job):
                self._express_free = False
                batch, express = self._take(short=True), True
        if batch is not None:
            self._lead(batch, express)
        self._await(job)
        if job.error is not None:
            raise InferenceError(f"the batch of this request failed: {job.error}") from job.error
        return job.logits

    def _await(self, job: Job) -> None:
        """Wait until the job is done, running any batch handed to this thread meanwhile."""
        deadline = job.enqueued + self.queue_timeout
        while True:
            woken = job.wake.wait(max(0.0, min(deadline - time.monotonic(), _POLL)))
            with self._cond:
                batch, express = job.lead.pop(0) if job.lead else (None, False)
                if batch is None:
                    if job.done:
                        return
                    if woken:
                        job.wake.clear()
                        continue
                    if time.monotonic() < deadline:
                        continue
                    if job.taken == 0:  # none of it has started: give up and leave the queue
                        self._cancel(job)
                        raise self._unavailable("overloaded: timed out in the queue, retry later",
                                                "queue_timeout")
                    deadline = math.inf  # part of it runs: the rest is most urgent, wait for it
                    continue
                if not job.lead:
                    job.wake.clear()
            self._lead(batch, express)

    def _gather(self) -> None:
        """Wait for more texts before a run, holding the slot (called with the lock held).

        With `wait` set: up to that long for a full batch. Otherwise only while another run is in
        progress and requests are on their way to the queue (counted by arrive()), for at most
        `gather`. Without this, a request that finds a slot free runs alone while its neighbours, a
        moment behind, wait for the next run: under load most runs would carry one text, the
        model's least efficient batch. A lone request, or one beside an idle slot, never waits.
        """
        deadline = time.monotonic() + (self.wait if self.wait > 0 else self.gather)
        while self._pending < self.max_texts and not self._stopping:
            if self.wait <= 0 and not (self._arriving and self.workers - self._free > 1):
                return  # gathering: nobody on the way, or no other run in progress
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take(self, short: bool = False) -> list[Item]:
        """Take the next run: the most urgent text and the queued texts it shares a run with best.

        With `short`, only texts of at most EXPRESS_TOKENS tokens are candidates (the express slot's run).
        """
        live = [item for item in self._heap if not item.job.cancelled]
        if not live:
            self._heap.clear()
            return []
        if short:
            live, rest = [i for i in live if i.tokens <= EXPRESS_TOKENS], [i for i in live if i.tokens > EXPRESS_TOKENS]
            if not live:
                return []
            self._heap = rest  # put back below, with the candidates not chosen
        # Among the most urgent texts, the length grouping decides which ones pad well together;
        # the group of the most urgent one runs now, the others stay queued.
        candidates = heapq.nsmallest(self.max_texts, live)
        groups = length_groups([item.tokens for item in candidates], self.max_tokens, self.max_texts)
        batch = [candidates[i] for i in sorted(next(group for group in groups if 0 in group))]
        chosen = {id(item) for item in batch}
        self._heap = [item for item in live if id(item) not in chosen] + (self._heap if short else [])
        heapq.heapify(self._heap)
        now = time.monotonic()
        for item in batch:
            self._pending -= 1
            self._pending_tokens -= item.tokens
            item.job.queued_tokens -= item.tokens
            if item.job.taken == 0:
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(now - item.job.enqueued)
                if item.job.timing is not None:
                    item.job.timing.taken = time.perf_counter()
            item.job.taken += 1
        self._queue_changed()
        return batch

    def _cancel(self, job: Job) -> None:
        """Drop a job's queued texts from the counts; the heap skips them (called with the lock held)."""
        job.cancelled = True
        self._pending -= len(job.encodings) - job.taken
        self._pending_tokens -= job.queued_tokens
        job.taken, job.queued_tokens = len(job.encodings), 0
        self._queue_changed()

    def _queue_changed(self) -> None:
        """Tell the metrics the queue's new depth (called with the lock held)."""
        if self.metrics is not None:
            self.metrics.queue_changed(self._pending)

    def _hand_over(self, batch: list[Item], express: bool = False) -> None:
        """Give a held slot and its next batch to the thread of the batch's most urgent text."""
        if not batch:
            if express:
                self._express_free = True
            else:
                self._free += 1
            self._cond.notify_all()
            return
        owner = batch[0].job
        owner.lead.append((batch, express))
        owner.wake.set()

    def _every_slot_runs_long(self) -> bool:
        """Return whether every regular slot runs a text over EXPRESS_TOKENS (lock held)."""
        return not self._free and self._long_runs >= self.workers

    def _express_open(self) -> bool:
        """Return whether the express slot is free and every regular slot runs a long text (lock held)."""
        return self._express_free and self._every_slot_runs_long()

    def _start_express(self) -> None:
        """Start a run of queued short texts in the express slot, if it is open (lock held)."""
        if self._express_open():
            batch = self._take(short=True)
            if batch:
                self._express_free = False
                self._hand_over(batch, express=True)

    @staticmethod
    def _short(job: Job) -> bool:
        """Return whether every text of a job may run in the express slot."""
        return all(len(encoding) <= EXPRESS_TOKENS for encoding in job.encodings)

    def _lead(self, batch: list[Item], express: bool = False) -> None:
        """Run a batch in this thread, then pass the slot on (or free it)."""
        long = not express and any(item.tokens > EXPRESS_TOKENS for item in batch)
        if long:
            with self._cond:
                self._long_runs += 1
                self._start_express()  # the short texts queued behind this run need not wait for it
        try:
            self._run(batch)
        except Exception as exc:  # a bug outside session.run: fail these requests, keep serving
            logger.exception("batch of %d texts failed outside the model", len(batch))
            with self._cond:
                for item in batch:
                    self._fail(item.job, exc)
        finally:
            with self._cond:
                if long:
                    self._long_runs -= 1
                if express:  # on while the regular slots still run long texts, else given back
                    self._hand_over(self._take(short=True) if self._every_slot_runs_long() else [], express=True)
                else:
                    self._hand_over(self._take() if self._heap else [])

    def _run(self, batch: list[Item]) -> None:
        """Run one batch in one session.run and resolve each job whose last text it was."""
        if all(item.job.error is not None for item in batch):
            return
        encodings = [item.job.encodings[item.index] for item in batch]
        # Alone: no other run, nothing queued, no request on its way; under load a run that takes every
        # core would share them with the runs that start beside it. Read without the lock: a hint.
        alone = (self._free == self.workers - 1 and self._express_free == self.express and not self._pending
                 and not self._arriving)
        started, began = time.monotonic(), time.perf_counter()
        try:
            logits = self.classifier.run(self.classifier.collate(encodings), alone=alone)
        except Exception as exc:  # InferenceError from session.run, or anything in collate
            with self._cond:
                for item in batch:
                    self._fail(item.job, exc)
            return
        ended = time.perf_counter()
        padded = len(batch) * max(len(encoding) for encoding in encodings)
        self.classifier.ready = True  # the model has answered: what /ready waits for
        with self._cond:
            # an exponential average follows load changes within a few runs
            self._seconds_per_token += 0.2 * ((time.monotonic() - started) / (padded + RUN_COST_TOKENS)
                                              - self._seconds_per_token)
            for item, row in zip(batch, self.classifier.split(logits, encodings), strict=True):
                job = item.job
                job.logits[item.index] = row
                if job.timing is not None:
                    job.timing.add_run(began, ended, len(batch), padded)
                job.left -= 1
                if job.left == 0:
                    job.wake.set()
        if self.metrics is not None:
            self.metrics.run_texts.observe(len(batch))

    def _fail(self, job: Job, exc: BaseException) -> None:
        """Fail a job once and wake its thread (called with the lock held)."""
        if job.error is None:
            job.error = exc
            self._cancel(job)
            job.wake.set()

    def _unavailable(self, message: str, reason: str) -> Unavailable:
        """Return the 503 error, with Retry-After from the queue's expected drain time."""
        if self.metrics is not None:
            self.metrics.rejections.labels(reason).inc()
        drain = self._pending_tokens * self._seconds_per_token / max(1, self.workers)
        return Unavailable(message, retry_after=min(60, max(1, math.ceil(drain))), reason=reason)


def handle_unavailable(exc: Unavailable) -> tuple[Response, int, dict[str, str]]:
    """Answer 503 JSON with Retry-After, so clients back off instead of piling up."""
    return jsonify(error=exc.message), 503, {"Retry-After": str(exc.retry_after)}


def init_app(app: Flask, scheduler: Scheduler | None) -> None:
    """Register the 503 handler and keep the scheduler (None: batching off) in the app's state."""
    state.store(app, scheduler=scheduler)
    app.register_error_handler(Unavailable, handle_unavailable)
    if scheduler is not None:
        app.wsgi_app = _announcing(app.wsgi_app, scheduler)  # type: ignore[method-assign]
        # tests build many apps: let each one's scheduler refuse work once its app is gone
        weakref.finalize(app, scheduler.stop, 0)


def _announcing(wsgi_app: Callable[..., Iterable[bytes]], scheduler: Scheduler) -> Callable[..., Iterable[bytes]]:
    """Wrap the WSGI app so the scheduler knows which POST requests are on their way to the queue."""

    def announced(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return wsgi_app(environ, start_response)
        scheduler.arrive()
        try:
            return wsgi_app(environ, start_response)
        finally:
            scheduler.depart()

    return announced
