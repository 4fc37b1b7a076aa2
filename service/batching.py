"""Dynamic micro-batching: request threads queue texts, one worker runs everything queued together."""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
import numpy as np
from flask import Flask, Response, jsonify

from service.classifier import Classifier, InferenceError, Prediction
from service.metrics import Metrics

logger = logging.getLogger(__name__)

# The fixed cost of one session.run, in padded tokens: in-process on the default model, a run took
# about a + b x tokens with a ~3.2 ms and b ~0.17-0.19 ms per token. Length groups merge while
# the padding this adds costs less than a run of its own.
RUN_COST_TOKENS = 20
_POLL = 1.0  # seconds between checks that the worker is alive while a started batch runs


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
    """One request's texts on their way through the queue; resolved by the worker."""

    texts: Sequence[str]
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    logits: np.ndarray | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


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
    """A bounded queue of requests and worker threads that each run one batch at a time."""

    def __init__(self, classifier: Classifier, *, max_texts: int, max_tokens: int, max_queue: int,
                 queue_timeout: float, wait: float = 0.0, workers: int = 1,
                 metrics: Metrics | None = None) -> None:
        """Configure the limits; start() starts the workers."""
        self.classifier = classifier
        self.max_texts, self.max_tokens, self.max_queue = max_texts, max_tokens, max_queue
        self.queue_timeout, self.wait = queue_timeout, wait
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._pending = 0  # texts queued and not yet taken by a worker
        self._seconds_per_text = 0.01  # running estimate, for Retry-After
        self._stopping = False
        self._cond = threading.Condition()
        self._workers = [threading.Thread(target=self._work, name=f"batch-worker-{n}", daemon=True)
                         for n in range(workers)]
        if metrics is not None:
            metrics.track_queue(lambda: self._pending)

    @property
    def depth(self) -> int:
        """Return the texts waiting in the queue."""
        return self._pending

    @property
    def alive(self) -> bool:
        """Return whether every worker thread is running."""
        return all(worker.is_alive() for worker in self._workers)

    def start(self) -> None:
        """Start the worker threads."""
        for worker in self._workers:
            worker.start()

    def warmup(self) -> None:
        """Classify the classifier's warm-up batches through the queue."""
        for texts in self.classifier.warmup_batches():
            self.classify(texts)

    def stop(self, timeout: float) -> bool:
        """Let the workers finish what is queued, then stop them; return whether they did in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.is_alive():
                worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)

    def classify(self, texts: Sequence[str], top_k: int | None = None,
                 function_to_apply: str | None = None) -> list[list[Prediction]]:
        """Queue texts, wait for their batch and post-process them in the calling thread."""
        job = Job(texts)
        with self._cond:
            if self._stopping:
                raise self._unavailable("the service is shutting down", "shutting_down")
            if self._pending + len(texts) > self.max_queue:
                raise self._unavailable("overloaded: the queue is full, retry later", "queue_full")
            self._queue.append(job)
            self._pending += len(texts)
            self._cond.notify()
        if not job.done.wait(self.queue_timeout):
            with self._cond:
                if not job.started:
                    self._queue.remove(job)
                    self._pending -= len(texts)
                    raise self._unavailable("overloaded: timed out in the queue, retry later",
                                            "queue_timeout")
            # a worker has the batch: it ends in the time of one run, unless the worker is gone
            while not job.done.wait(_POLL):
                if not self.alive:
                    raise InferenceError("the batch worker stopped")
        if job.error is not None:
            raise InferenceError(f"the batch of this request failed: {job.error}") from job.error
        return self.classifier.postprocess(job.logits, top_k, function_to_apply)

    def _unavailable(self, message: str, reason: str) -> Unavailable:
        """Return the 503 error, with Retry-After from the queue's expected drain time."""
        if self.metrics is not None:
            self.metrics.rejections.labels(reason).inc()
        drain = self._pending * self._seconds_per_text
        return Unavailable(message, retry_after=min(60, max(1, math.ceil(drain))), reason=reason)

    def _work(self) -> None:
        """Run batches until stopped; a failing batch fails only its own requests."""
        while True:
            jobs = self._take()
            if not jobs:
                return
            started = time.monotonic()
            try:
                self._run(jobs)
            except Exception as exc:  # a bug outside session.run: fail these requests, keep serving
                logger.exception("batch of %d requests failed outside the model", len(jobs))
                for job in jobs:
                    job.error = job.error or exc
            finally:
                for job in jobs:
                    job.done.set()
            texts = sum(len(job.texts) for job in jobs)
            # an exponential average follows load changes within a few batches
            seconds = (time.monotonic() - started) / texts
            self._seconds_per_text += 0.2 * (seconds - self._seconds_per_text)

    def _take(self) -> list[Job]:
        """Wait for work; take queued requests up to max_texts (the first one whatever its size)."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return []
                self._cond.wait()
            if self.wait > 0:
                deadline = time.monotonic() + self.wait
                while self._pending < self.max_texts and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            jobs: list[Job] = []
            texts = 0
            while self._queue and (not jobs or texts + len(self._queue[0].texts) <= self.max_texts):
                job = self._queue.popleft()
                job.started = True
                jobs.append(job)
                texts += len(job.texts)
            self._pending -= texts
        if self.metrics is not None:
            now = time.monotonic()
            for job in jobs:
                self.metrics.queue_wait.observe(now - job.enqueued)
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        """Tokenize the jobs' texts together, run each length group once, resolve each job when done."""
        owners: list[Job] = []  # the job of each text
        first: dict[int, int] = {}  # job -> index of its first text
        for job in jobs:
            first[id(job)] = len(owners)
            owners.extend([job] * len(job.texts))
        encodings = self.classifier.encode([text for job in jobs for text in job.texts])
        rows: dict[int, np.ndarray] = {}  # text index -> logits row
        remaining = {id(job): len(job.texts) for job in jobs}
        for group in length_groups([len(e) for e in encodings], self.max_tokens, self.max_texts):
            members = list({id(owners[i]): owners[i] for i in group}.values())
            if all(job.error is not None for job in members):
                continue
            try:
                logits = self.classifier.run(self.classifier.collate([encodings[i] for i in group]))
            except Exception as exc:  # InferenceError from session.run, or anything in collate
                for job in members:
                    job.error = job.error or exc
                    job.done.set()
                continue
            if self.metrics is not None:
                self.metrics.run_texts.observe(len(group))
            self.classifier.ready = True  # the model has answered: what /ready waits for
            for i, row in zip(group, logits, strict=True):
                rows[i] = row
                job = owners[i]
                remaining[id(job)] -= 1
                if remaining[id(job)] == 0 and job.error is None:
                    # answer as soon as a request's own texts are done, not when the whole batch is
                    job.logits = np.stack([rows[first[id(job)] + k] for k in range(len(job.texts))])
                    job.done.set()


def handle_unavailable(exc: Unavailable) -> tuple[Response, int, dict[str, str]]:
    """Answer 503 JSON with Retry-After, so clients back off instead of piling up."""
    return jsonify(error=exc.message), 503, {"Retry-After": str(exc.retry_after)}


def init_app(app: Flask, scheduler: Scheduler | None) -> None:
    """Register the 503 handler; the scheduler (None: batching off) lives in app.extensions."""
    app.extensions["service.scheduler"] = scheduler
    app.register_error_handler(Unavailable, handle_unavailable)
    if scheduler is not None:
        # tests build many apps: let each one's idle worker end with its app
        weakref.finalize(app, scheduler.stop, 0)
