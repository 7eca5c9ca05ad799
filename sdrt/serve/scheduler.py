"""The server's work queue: a bounded queue, a worker over one Pipeline, batching, deadlines and
cancellation at the next step.

Queue batching (the default): generations run one batch at a time (a batch already uses every core or
the whole GPU). When the worker takes a request, it also takes the waiting requests with the same
`Pipeline.batch_key` (same latent size, schedule, sampler and guidance), up to `max_batch` images, and
runs them as one `Pipeline.generate_batch`.

Continuous batching (`continuous=True`): each request runs in a thread of its own as soon as its images
fit beside the running ones (`max_batch`), and their UNet calls are merged step by step
(sdrt.serve.continuous): a request joins at its next UNet call and leaves after its last, whatever its
sampler, step count, guidance or size.

A request whose client left, whose deadline passed, or that `/interrupt` hit stops at its next step
(a batch stops when none of its requests is still wanted).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from sdrt.errors import Interrupted, SdrtError

log = logging.getLogger(__name__)


class QueueFull(SdrtError):
    """The queue holds max_queue requests: answer 429 and suggest when to come back."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the queue is full ({depth} requests waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(SdrtError):
    """The request was cancelled before it finished: `reason` is deadline, interrupt, disconnect or shutdown."""

    def __init__(self, reason: str):
        super().__init__({"deadline": "the request's deadline passed before it finished",
                          "interrupt": "interrupted (POST /sdapi/v1/interrupt)",
                          "disconnect": "the client disconnected",
                          "shutdown": "the server is shutting down"}[reason])
        self.reason = reason


@dataclass(eq=False)
class Job:
    request: object  # sdrt.runtime.request.GenerateRequest
    key: tuple | None  # Pipeline.batch_key; None runs alone
    deadline: float  # time.monotonic() by which it must be done
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when its batch began
    cancelled: str | None = None  # a Cancelled reason
    loras: tuple = ()  # Pipeline.lora_key: the LoRA set its sessions need

    @property
    def images(self) -> int:
        return self.request.num_images


@dataclass
class Progress:
    """A running batch (one request in continuous mode), for /sdapi/v1/progress."""

    step: int = 0
    total: int = 0
    started: float = 0.0
    denoised: object = None  # the latest (N, C, h, w) data estimate, for previews
    jobs: list = field(default_factory=list)


class Scheduler:
    """pipe: a sdrt Pipeline (or anything with its __call__, generate_batch, batch_key and interrupt).
    metrics: a sdrt.serve.metrics.Metrics, or None."""

    def __init__(self, pipe, max_queue: int = 16, max_batch: int = 4, timeout: float = 600.0, metrics=None,
                 continuous: bool = False):
        self.pipe, self.max_queue, self.max_batch, self.timeout = pipe, max_queue, max_batch, timeout
        self.metrics, self.continuous = metrics, continuous
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._seconds_per_image = 1.0  # running estimate, for Retry-After
        self._runs: list[Progress] = []  # the batches running (one in queue mode)
        self.batcher = None
        if continuous:
            from sdrt.serve.continuous import StepBatcher

            self.batcher = StepBatcher(on_call=self._merged_call)
            pipe.unet_gate = self.batcher.gate
        self._worker = threading.Thread(target=self._run, name="sdrt-worker", daemon=True)
        self._worker.start()

    # -- the request side ---------------------------------------------------------------------
    def submit(self, request, timeout: float | None = None) -> Job:
        """Queue REQUEST (already checked against the engine dir); QueueFull when there's no room."""
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        job = Job(request, self.pipe.batch_key(request), time.monotonic() + limit,
                  loras=self.pipe.lora_key(request) if hasattr(self.pipe, "lora_key") else ())
        with self._cond:
            if self._closing:
                raise Cancelled("shutdown")
            if len(self._queue) >= self.max_queue:
                self._count("rejections", "queue_full")
                raise QueueFull(len(self._queue), self.retry_after())
            self._queue.append(job)
            self._gauges()
            self._cond.notify()
        return job

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: the work ahead at the recent speed."""
        waiting = sum(j.images for j in self._queue) + sum(j.images for j in self.progress.jobs)
        return max(1, math.ceil(waiting * self._seconds_per_image))

    def cancel(self, job: Job, reason: str) -> None:
        """Drop JOB if it waits; if it runs, its batch stops at the next step unless others want it."""
        with self._cond:
            if job.future.done() or job.cancelled:
                return
            job.cancelled = reason
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, exception=Cancelled(reason))
                self._gauges()
            elif job in self.progress.jobs and all(j.cancelled for j in self.progress.jobs):
                self.pipe.interrupt()  # stops within the current engine call

    def interrupt(self) -> int:
        """/sdapi/v1/interrupt: cancel the running batch (A1111 stops the current job); how many requests."""
        with self._cond:
            running = [j for j in self.progress.jobs if not j.cancelled]
        for job in running:
            self.cancel(job, "interrupt")
        return len(running)

    def depth(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.max_queue

    def close(self, timeout: float = 60.0) -> None:
        """Stop taking work, cancel what waits, stop what runs at its next step, wait for the worker
        (an engine call must not be running when the process exits)."""
        with self._cond:
            self._closing = True
            waiting = list(self._queue)
            self._cond.notify_all()
        for job in waiting:
            self.cancel(job, "shutdown")
        for job in list(self.progress.jobs):
            self.cancel(job, "shutdown")
        self._worker.join(timeout)

    # -- the worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        lower_priority()
        threads: list[threading.Thread] = []
        while True:
            with self._cond:
                while not self._closing and not (self._queue and self._room()):
                    self._cond.wait()
                if self._closing and not self._queue:
                    break
                batch = self._take()
                if not batch:
                    continue
                run = Progress(started=time.monotonic(), jobs=batch)
                self._runs.append(run)
                self._gauges()
            if not self.continuous:
                self._execute(run)
                continue
            threads = [t for t in threads if t.is_alive()]
            threads.append(threading.Thread(target=self._execute, args=(run,), name="sdrt-generation", daemon=True))
            threads[-1].start()
        for t in threads:
            t.join()

    def _room(self) -> bool:
        """Queue mode: nothing runs. Continuous mode: the next request's images fit beside the running ones,
        which run with its LoRA set (the sessions hold one set at a time)."""
        jobs = [j for r in self._runs for j in r.jobs]
        if not self.continuous or not jobs:
            return not jobs
        return sum(j.images for j in jobs) + self._queue[0].images <= self.max_batch and all(
            j.loras == self._queue[0].loras for j in jobs)

    @property
    def progress(self) -> Progress:
        """The oldest running batch's progress, with every running request in `jobs`."""
        runs = list(self._runs)
        if not runs:
            return Progress()
        first = runs[0]
        return Progress(first.step, first.total, first.started, first.denoised, [j for r in runs for j in r.jobs])

    def _take(self) -> list[Job]:
        """The oldest live request and (queue mode) the waiting ones that can share its UNet calls."""
        self._expire()
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, images = [first], first.images
        if first.key is not None and not self.continuous:
            for job in list(self._queue):
                if job.key == first.key and images + job.images <= self.max_batch:
                    self._queue.remove(job)
                    batch.append(job)
                    images += job.images
        return batch

    def _expire(self) -> None:
        """Requests past their deadline: a waiting one is answered now, a running one stops at its
        batch's next step. Called with the lock held, when the worker takes work and at every step."""
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now]:
            self._queue.remove(job)
            job.cancelled = "deadline"
            self._finish(job, exception=Cancelled("deadline"))
        for job in (j for r in self._runs for j in r.jobs):
            if not job.cancelled and job.deadline <= now:
                job.cancelled = "deadline"
        self._gauges()

    def _execute(self, run: Progress) -> None:
        if self.continuous:
            lower_priority()
        outcomes = []
        try:
            outcomes = self._generate(run)
        finally:
            with self._cond:
                self._runs.remove(run)
                self._gauges()  # before any answer: a client that reads /metrics next sees it done
                self._cond.notify_all()
            for job, result, exception in outcomes:
                self._finish(job, result, exception)

    def _generate(self, run: Progress) -> list[tuple]:
        """Run RUN's batch; (job, result, exception) for each of its jobs."""
        batch, t0 = run.jobs, run.started
        for job in batch:
            job.started = t0
            self._observe("queue_wait", t0 - job.enqueued)
        callback = self._callback(run)
        try:
            if len(batch) == 1:
                results = [self.pipe(batch[0].request, callback=callback)]
            else:
                results = self.pipe.generate_batch([j.request for j in batch], callback=callback)
        except Interrupted:
            return [(job, None, Cancelled(job.cancelled or "interrupt")) for job in batch]
        except Exception as e:  # noqa: BLE001 - handed to each waiting request, which answers for it
            return [(job, None, e) for job in batch]
        seconds = time.monotonic() - t0
        images = sum(j.images for j in batch)
        share = max(1, len(self._runs)) if self.continuous else 1  # generations that ran beside it
        self._seconds_per_image = 0.7 * self._seconds_per_image + 0.3 * seconds / images / share
        self._record_speed(run.total, seconds, images)
        return [(job, None, Cancelled(job.cancelled)) if job.cancelled else (job, result, None)
                for job, result in zip(batch, results)]

    def _callback(self, run: Progress):
        """The pipeline's step callback for RUN: record progress; stop when none of its requests is wanted."""
        def step(i: int, total: int, latents, denoised) -> None:
            run.step, run.total, run.denoised = i + 1, total, denoised
            with self._cond:
                self._expire()  # the queue's too: a waiting request need not wait for this batch to end
            if all(j.cancelled for j in run.jobs):
                raise Interrupted("every request of the batch was cancelled")
        return step

    def _finish(self, job: Job, result=None, exception: BaseException | None = None) -> None:
        if job.future.done():
            return
        if isinstance(exception, Cancelled):
            self._count("cancelled", exception.reason)
        if exception is not None:
            job.future.set_exception(exception)
        else:
            job.future.set_result(result)

    # -- metrics ------------------------------------------------------------------------------
    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.in_flight.set(len(self.progress.jobs))

    def _merged_call(self, rows: int, generations: int) -> None:
        if self.metrics is not None:
            self.metrics.unet_call_generations.observe(generations)

    def _count(self, name: str, label: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).labels(label).inc()

    def _observe(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).observe(value)

    def _record_speed(self, steps: int, seconds: float, images: int) -> None:
        """steps: the steps that ran (img2img runs a part of the schedule)."""
        if self.metrics is None:
            return
        m = self.metrics
        m.unet_steps.inc(steps)
        m.images.inc(images)
        m.batch_images.observe(images)
        m.steps_per_second.set(steps / seconds)
        m.images_per_second.set(images / seconds)


def lower_priority(step: int = 5) -> None:
    """Run this thread (and the engine threads it starts) a few nice levels below the event loop, so that
    a busy generation never keeps the HTTP front (/health, 429s) waiting for a core. Linux only; harmless
    where it can't."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + step)
    except (AttributeError, OSError):
        pass
