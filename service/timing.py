"""Where one request's time goes: its stages on time.perf_counter's clock, read by headers, logs and traces."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Run:
    """One model run that carried texts of the request: when, and how large the whole batch was."""

    start: float
    end: float
    texts: int  # texts in the batch, this request's and others'
    tokens: int | None  # padded tokens of the batch (texts x its longest); None: the backend does not say


@dataclass(slots=True)
class Timing:
    """A request's stages, as perf_counter readings; None: the stage did not happen (yet)."""

    started: float = field(default_factory=time.perf_counter)
    wall_ns: int = field(default_factory=time.time_ns)  # the epoch time of `started`, for trace spans
    tokenizing: float | None = None  # validation done, tokenizing starts
    tokenized: float | None = None
    enqueued: float | None = None  # with batching: the texts joined the queue
    taken: float | None = None  # the first of them left it for a model run
    runs: list[Run] = field(default_factory=list)
    inferred: float | None = None  # logits in hand, post-processing starts
    texts: int | None = None
    tokens: int | None = None  # None on the reference backends, which tokenize inside their pipeline
    characters: int | None = None

    def add_run(self, start: float, end: float, texts: int, tokens: int | None) -> None:
        """Record a model run once, however many of this request's texts it carried."""
        if not self.runs or self.runs[-1].start != start:
            self.runs.append(Run(start, end, texts, tokens))

    def epoch_ns(self, reading: float) -> int:
        """Return a perf_counter reading of this request as nanoseconds since the epoch."""
        return self.wall_ns + round((reading - self.started) * 1e9)

    @property
    def tokenization_seconds(self) -> float:
        """Return the time spent tokenizing (0 where the backend tokenizes inside its run)."""
        return self.tokenized - self.tokenizing if self.tokenized is not None and self.tokenizing is not None else 0.0

    @property
    def queue_seconds(self) -> float:
        """Return the time from joining the queue to the first model run taking a text (0 without batching)."""
        return self.taken - self.enqueued if self.taken is not None and self.enqueued is not None else 0.0

    @property
    def inference_seconds(self) -> float:
        """Return the time from the first model run's start to the last one's end."""
        if not self.runs:
            return 0.0
        return max(run.end for run in self.runs) - min(run.start for run in self.runs)
