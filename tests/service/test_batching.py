"""The batch scheduler on the real default model: grouping, per-request answers, order, limits and faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.batching import EXPRESS_TOKENS, RUN_COST_TOKENS, Scheduler, Unavailable, length_groups
from service.classifier import Classifier, InferenceError
from service.metrics import Metrics
from tests.testkit import NEGATIVE, POSITIVE


@pytest.fixture
def make_scheduler(classifier: Classifier) -> Iterator[Any]:
    """Return a factory of schedulers on the session's classifier, stopped after the test."""
    made: list[Scheduler] = []

    def make(start: bool = True, model: Classifier | None = None, **limits: Any) -> Scheduler:
        options = {"max_texts": 32, "max_tokens": 8192, "max_queue": 64, "queue_timeout": 30.0} | limits
        scheduler = Scheduler(model or classifier, metrics=Metrics(), **options)
        if start:
            scheduler.start()
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.stop(timeout=10)


def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    """Return one sample of the scheduler's metrics registry."""
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@pytest.mark.parametrize(("lengths", "expected"), [
    ([10, 10, 10, 10], [[0, 1, 2, 3]]),  # equal lengths: one run, no padding
    ([256, 5], [[1], [0]]),  # padding 5 to 256 costs far more than a second run
    ([12, 9, 10, 11], [[1, 2, 3, 0]]),  # a little padding is cheaper than a run
])
def test_length_groups_trade_padding_against_runs(lengths: list[int], expected: list[list[int]]) -> None:
    assert length_groups(lengths, max_tokens=8192, max_texts=32) == expected


def test_length_groups_cover_every_text_once_within_the_limits() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(3, 257, size=200)]
    groups = length_groups(lengths, max_tokens=2048, max_texts=16)
    assert sorted(i for group in groups for i in group) == list(range(200))
    for group in groups:
        assert len(group) <= 16 and len(group) * max(lengths[i] for i in group) <= 2048
    # the splits pay off: fewer padded tokens than one text per run would cost in runs
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded + RUN_COST_TOKENS * len(groups) < sum(lengths) + RUN_COST_TOKENS * len(lengths)
    assert length_groups([300], max_tokens=256, max_texts=1) == [[0]]  # too long alone still runs


def test_concurrent_requests_share_a_run_and_keep_their_own_options(make_scheduler: Any,
                                                                      classifier: Classifier) -> None:
    # a long wait, ended early when 4 texts are queued: the four requests meet in one batch for sure
    scheduler = make_scheduler(max_texts=4, wait=30.0)
    jobs = [([POSITIVE], 1, None), ([NEGATIVE], None, None), ([POSITIVE], None, "none"),
            ([NEGATIVE], 2, "sigmoid")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda job: scheduler.classify(job[0], top_k=job[1], function_to_apply=job[2]),
                                jobs))
    assert _sample(scheduler.metrics, "service_model_run_texts_count") == 1  # one session.run
    assert _sample(scheduler.metrics, "service_model_run_texts_sum") == 4
    for (texts, top_k, function), answer in zip(jobs, answers, strict=True):
        alone = classifier.classify(texts, top_k=top_k, function_to_apply=function)
        assert [[p["label"] for p in ranked] for ranked in answer] == \
               [[p["label"] for p in ranked] for ranked in alone]
        # one activation scale per token (the default model): sharing a run does not move scores
        for ranked, ranked_alone in zip(answer, alone, strict=True):
            for p, q in zip(ranked, ranked_alone, strict=True):
                assert p["score"] == pytest.approx(q["score"], abs=1e-5 if function == "none" else 1e-6)
    assert [len(answer[0]) for answer in answers] == [1, 2, 2, 2]


def test_a_lone_request_runs_in_its_own_thread(make_scheduler: Any, classifier: Classifier,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = make_scheduler()
    runners: list[str] = []
    run = classifier.run

    def recording_run(feeds: dict[str, np.ndarray], alone: bool = True) -> np.ndarray:
        runners.append(threading.current_thread().name)
        return run(feeds, alone)

    monkeypatch.setattr(classifier, "run", recording_run)
    caller = threading.Thread(target=scheduler.classify, args=([POSITIVE],), name="the-request")
    caller.start()
    caller.join(timeout=60)
    assert runners == ["the-request"]  # no hand-off to another thread


def test_a_run_is_told_it_goes_alone_only_with_nothing_beside_it(make_scheduler: Any, classifier: Classifier,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a run with no other in progress, nothing queued and no request arriving may take every core."""
    scheduler = make_scheduler(workers=2)
    hold = threading.Event()
    seen: list[tuple[int, bool]] = []  # (padded tokens, alone) of each run as it starts
    run = classifier.run

    def watched_run(feeds: dict[str, np.ndarray], alone: bool = True) -> np.ndarray:
        tokens = int(feeds["input_ids"].shape[1])
        seen.append((tokens, alone))
        if tokens > 100:
            hold.wait(60)  # keep the long run in progress
        return run(feeds, alone)

    monkeypatch.setattr(classifier, "run", watched_run)
    scheduler.classify([POSITIVE])
    assert [alone for _, alone in seen] == [True]
    with ThreadPoolExecutor(max_workers=2) as pool:
        long_request = pool.submit(scheduler.classify, [NEGATIVE + " really" * 200])
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        short_request = pool.submit(scheduler.classify, [POSITIVE])
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        hold.set()
        long_request.result(timeout=60)
        short_request.result(timeout=60)
    assert [(tokens > 100, alone) for tokens, alone in seen] == [(False, True), (True, True), (False, False)]


def _watch_runs(classifier: Classifier, monkeypatch: pytest.MonkeyPatch,
                hold: threading.Event | None = None) -> list[tuple[int, int]]:
    """Record the (texts, padded tokens) of every run, in the order the runs start.

    With `hold`, runs of more than 100 tokens wait for that event first: a run kept in progress.
    """
    shapes: list[tuple[int, int]] = []
    run = classifier.run

    def watched_run(feeds: dict[str, np.ndarray], alone: bool = True) -> np.ndarray:
        texts, tokens = feeds["input_ids"].shape
        shapes.append((int(texts), int(tokens)))
        if hold is not None and tokens > 100:
            hold.wait(60)
        return run(feeds, alone)

    monkeypatch.setattr(classifier, "run", watched_run)
    return shapes


def test_a_short_text_overtakes_long_texts_queued_just_before_it(make_scheduler: Any, classifier: Classifier,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # not started: the texts queue up, then one slot runs one text per batch in queue order
    scheduler = make_scheduler(start=False, max_texts=1, workers=1)
    shapes = _watch_runs(classifier, monkeypatch)
    # three long texts of different lengths (under the 256-token limit), so their runs tell them apart
    long_texts = [NEGATIVE + " really" * count for count in (200, 210, 220)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for text in (*long_texts, POSITIVE):
            futures.append(pool.submit(scheduler.classify, [text]))
            while scheduler.depth < len(futures):
                threading.Event().wait(0.005)
        scheduler.start()
        for future in futures:
            future.result(timeout=60)
    expected = [len(encoding) for encoding in classifier.encode([POSITIVE, *long_texts])]
    assert [tokens for _, tokens in shapes] == expected  # the short one first, then the long ones in order


def test_a_long_text_is_not_overtaken_by_texts_that_came_much_later(make_scheduler: Any, classifier: Classifier,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = make_scheduler(start=False, max_texts=1, workers=1)
    shapes = _watch_runs(classifier, monkeypatch)
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(scheduler.classify, [NEGATIVE + " really" * 300])
        while scheduler.depth < 1:
            threading.Event().wait(0.005)
        # its deadline is arrival + 8 x its expected run time: a short text arriving after that is later
        late = scheduler._heap[0].deadline - time.monotonic() + 0.05
        threading.Event().wait(max(0.0, late))
        second = pool.submit(scheduler.classify, [POSITIVE])
        while scheduler.depth < 2:
            threading.Event().wait(0.005)
        scheduler.start()
        first.result(timeout=60)
        second.result(timeout=60)
    # the order the runs started in (the order the threads return in is the OS scheduler's)
    runs = [tokens for _, tokens in shapes]
    assert runs[0] > runs[1] == len(classifier.encode([POSITIVE])[0])


def test_a_slot_beside_a_running_one_waits_for_requests_on_their_way(make_scheduler: Any, classifier: Classifier,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a long gather window, ended early by the arrival it waits for: no timing involved
    scheduler = make_scheduler(workers=2, gather=30.0)
    release = threading.Event()
    shapes = _watch_runs(classifier, monkeypatch, hold=release)
    on_its_way, go = threading.Event(), threading.Event()

    def late_request() -> Any:
        scheduler.arrive()  # what the WSGI wrapper does when a POST comes in
        on_its_way.set()
        go.wait(60)
        return scheduler.classify([NEGATIVE])

    with ThreadPoolExecutor(max_workers=3) as pool:
        running = pool.submit(scheduler.classify, [NEGATIVE + " really" * 300])
        while not shapes:  # the long run holds one slot
            threading.Event().wait(0.005)
        late = pool.submit(late_request)
        on_its_way.wait(60)
        first = pool.submit(scheduler.classify, [POSITIVE])  # the other slot is free
        while scheduler.depth < 1:
            threading.Event().wait(0.005)
        threading.Event().wait(0.2)
        assert [texts for texts, _ in shapes] == [1] and not first.done()  # it waits for the request on its way...
        go.set()
        answers = [first.result(timeout=60), late.result(timeout=60)]
        assert [texts for texts, _ in shapes] == [1, 2]  # ...and both ran in one batch beside the long run
        release.set()
        running.result(timeout=60)
    assert [answer[0][0]["label"] for answer in answers] == \
        [ranked[0]["label"] for ranked in classifier.classify([POSITIVE, NEGATIVE])]
    assert scheduler.arriving == 0


@pytest.mark.parametrize("long_run", [False, True])
def test_a_free_slot_does_not_wait_without_a_run_in_progress_or_requests_on_their_way(
        make_scheduler: Any, classifier: Classifier, monkeypatch: pytest.MonkeyPatch, long_run: bool) -> None:
    scheduler = make_scheduler(workers=2, gather=30.0)
    release = threading.Event()
    shapes = _watch_runs(classifier, monkeypatch, hold=release)
    with ThreadPoolExecutor(max_workers=2) as pool:
        if long_run:  # a run in progress, but nobody on the way
            running = pool.submit(scheduler.classify, [NEGATIVE + " really" * 300])
            while not shapes:
                threading.Event().wait(0.005)
        else:  # someone on the way, but no run in progress
            ready = threading.Event()
            pool.submit(lambda: (scheduler.arrive(), ready.set(), release.wait(60), scheduler.depart()))
            ready.wait(60)
        started = time.monotonic()
        scheduler.classify([POSITIVE])
        assert time.monotonic() - started < 15  # far below the 30 s window
        release.set()
        if long_run:
            running.result(timeout=60)
    assert scheduler.arriving == 0


def test_a_request_larger_than_a_batch_is_answered_whole_in_order(make_scheduler: Any,
                                                                  classifier: Classifier) -> None:
    scheduler = make_scheduler(max_texts=2, workers=2)
    texts = [POSITIVE, NEGATIVE, "Terrible. I hated it.", "What a great, delightful movie.", POSITIVE]
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda _: scheduler.classify(texts), range(3)))
    expected = [ranked[0]["label"] for ranked in classifier.classify(texts)]
    assert all([ranked[0]["label"] for ranked in answer] == expected for answer in answers)
    assert _sample(scheduler.metrics, "service_model_run_texts_sum") == 15
    # at most 2 texts per batch: the 15 texts took at least 8 runs, none of more than 2
    assert _sample(scheduler.metrics, "service_model_run_texts_count") >= 8
    assert _sample(scheduler.metrics, "service_model_run_texts_bucket", {"le": "2.0"}) == \
        _sample(scheduler.metrics, "service_model_run_texts_count")


def test_two_slots_handed_to_one_request_both_run(make_scheduler: Any, classifier: Classifier) -> None:
    # not started: one request's two texts queue as two one-text batches; start() hands both slots to
    # that request's thread at once, which must run both (a dropped batch would leave it waiting)
    scheduler = make_scheduler(start=False, max_texts=1, workers=2)
    answers: list[Any] = []
    caller = threading.Thread(target=lambda: answers.append(scheduler.classify([POSITIVE, NEGATIVE])),
                              daemon=True)
    caller.start()
    while scheduler.depth < 2:
        threading.Event().wait(0.005)
    scheduler.start()
    caller.join(timeout=30)
    assert answers, "the request never got both of its texts back"
    labels = [ranked[0]["label"] for ranked in answers[0]]
    assert labels == [ranked[0]["label"] for ranked in classifier.classify([POSITIVE, NEGATIVE])]
    assert scheduler.stop(timeout=5)  # both slots came back


def test_a_full_queue_answers_at_once_and_a_waiting_request_times_out(make_scheduler: Any) -> None:
    # workers not started yet: whatever is queued stays queued, with no timing involved
    scheduler = make_scheduler(start=False, max_queue=3, queue_timeout=0.2)
    with pytest.raises(Unavailable) as timed_out:
        scheduler.classify([POSITIVE])
    assert timed_out.value.reason == "queue_timeout" and timed_out.value.retry_after >= 1
    assert scheduler.depth == 0  # a request that gave up leaves the queue
    scheduler.queue_timeout = 60.0
    waiting = ThreadPoolExecutor(max_workers=1)
    future = waiting.submit(scheduler.classify, [POSITIVE, NEGATIVE])
    while scheduler.depth < 2:
        threading.Event().wait(0.01)
    with pytest.raises(Unavailable) as full:
        scheduler.classify([POSITIVE, POSITIVE])  # 2 + 2 > 3
    assert full.value.reason == "queue_full" and 1 <= full.value.retry_after <= 60
    assert "queue is full" in full.value.message
    assert _sample(scheduler.metrics, "service_rejections_total", {"reason": "queue_full"}) == 1
    assert _sample(scheduler.metrics, "service_rejections_total", {"reason": "queue_timeout"}) == 1
    assert _sample(scheduler.metrics, "service_queue_depth") == 2
    scheduler.start()  # the queued request is served once a worker runs
    assert [r[0]["label"] for r in future.result(timeout=60)] == ["POSITIVE", "NEGATIVE"]
    waiting.shutdown()
    assert scheduler.depth == 0


def test_a_failing_run_fails_only_its_requests_and_the_worker_goes_on(model_dir: Path, make_scheduler: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = Classifier(model_dir, intra_op_threads=1)  # its own copy: the fault stays in this test
    poison_text = NEGATIVE + " really" * 300  # 256 tokens: a length group of its own
    poison = model.encode([poison_text])[0].ids
    collate = model.collate

    def wrong_dtype_for_the_poison(encodings: list) -> dict[str, np.ndarray]:
        feeds = collate(encodings)
        if any(encoding.ids == poison for encoding in encodings):  # ORT then fails for real
            feeds["input_ids"] = feeds["input_ids"].astype(np.float32)
        return feeds

    monkeypatch.setattr(model, "collate", wrong_dtype_for_the_poison)
    scheduler = make_scheduler(model=model, max_texts=3, wait=30.0)  # the three meet in one batch
    texts = [POSITIVE, poison_text, NEGATIVE]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(scheduler.classify, [text]) for text in texts]
        outcomes = [future.exception(timeout=60) or future.result() for future in futures]
    assert _sample(scheduler.metrics, "service_queue_wait_seconds_count") == 3
    assert _sample(scheduler.metrics, "service_model_run_texts_count") == 1  # the run that succeeded
    assert isinstance(outcomes[1], InferenceError)
    assert "onnxruntime failed" in str(outcomes[1].__cause__)
    assert [outcomes[0][0][0]["label"], outcomes[2][0][0]["label"]] == ["POSITIVE", "NEGATIVE"]
    assert scheduler.alive
    scheduler.wait = 0.0
    assert scheduler.classify(["a wonderful film"])[0][0]["label"] == "POSITIVE"  # the worker survived


def test_stop_finishes_queued_work_then_refuses(make_scheduler: Any) -> None:
    scheduler = make_scheduler(start=False)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(scheduler.classify, [POSITIVE])
        while scheduler.depth < 1:
            threading.Event().wait(0.01)
        scheduler.start()
        assert scheduler.stop(timeout=60)
        assert future.result(timeout=1)[0][0]["label"] == "POSITIVE"
    assert not scheduler.alive
    with pytest.raises(Unavailable) as refused:
        scheduler.classify([POSITIVE])
    assert refused.value.reason == "shutting_down"


@pytest.mark.parametrize("express", [True, False], ids=["express", "no-express"])
def test_a_short_request_runs_beside_a_long_run_only_in_the_express_slot(
        model_dir: Path, make_scheduler: Any, monkeypatch: pytest.MonkeyPatch, express: bool) -> None:
    model = Classifier(model_dir, intra_op_threads=1)  # its own copy: the hold stays in this test
    long_text = NEGATIVE + " It drags on and on." * 60  # 256 tokens
    release, held = threading.Event(), threading.Event()
    run = model.run

    def hold_long_runs(feeds: dict[str, np.ndarray], alone: bool = True) -> np.ndarray:
        if feeds["input_ids"].shape[1] > EXPRESS_TOKENS:
            held.set()
            release.wait(timeout=30)
        return run(feeds, alone)

    monkeypatch.setattr(model, "run", hold_long_runs)
    scheduler = make_scheduler(model=model, workers=1, express=express)
    with ThreadPoolExecutor(max_workers=3) as pool:
        long = pool.submit(scheduler.classify, [long_text])
        assert held.wait(timeout=30)
        another_long = pool.submit(scheduler.classify, [long_text])
        short = pool.submit(scheduler.classify, [POSITIVE])
        try:
            if express:  # answered while the long run still holds the only regular slot
                assert short.result(timeout=30)[0][0]["label"] == "POSITIVE"
                assert not long.done() and not another_long.done()  # a long text never takes the express slot
            else:
                with pytest.raises(TimeoutError):
                    short.result(timeout=0.5)
        finally:
            release.set()
        assert [future.result(timeout=30)[0][0]["label"] for future in (long, another_long, short)] == [
            "NEGATIVE", "NEGATIVE", "POSITIVE"]
    assert scheduler.stop(timeout=5)  # every slot, the express one included, came back
