"""Where jobs run: Celery workers on Redis, or (no broker configured) child processes of the api.

Both run `tasks.run_job` on a job id whose record and inputs are already in the data directory,
so the api's answers (202 + job id, GET /jobs/{id}) are the same in both modes. In both, the api
sweeps for jobs whose runner was lost (`sweep_forever`, see `storage/leases.py`).
"""

import asyncio
import logging
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import redis
from anyio.to_thread import run_sync
from celery import Celery

from byorl.service.jobs import tasks
from byorl.service.settings import Settings
from byorl.service.storage.job_store import JobStore

log = logging.getLogger(__name__)
TASK = "byorl.run_job"
QUEUE = "celery"  # Celery's default queue: its Redis list length is the queue depth
FAST_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def make_celery(settings: Settings) -> Celery:
    """The Celery app of api and workers: a job whose pool process dies is delivered again at
    once, a live job's message is not delivered twice (visibility timeout beyond the hard time
    limit), and workers recycle. (A job whose whole worker died is queued again by the lease
    sweep, not by Redis, whose visibility timeout is hours.)"""
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Sweep for jobs of dead workers often relative to the timeout (kombu: every 100 s).
        "unacked_restore_interval": max(1, min(60, settings.visibility_timeout_s // 10)),
        "unacked_restore_throttle": 1,
    }
    app = Celery("byorl", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_proc_alive_timeout=settings.worker_proc_alive_timeout_s,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_kill_after_s,
        broker_transport_options=transport,
        # Fail in seconds, not the default ~20 s, when Redis is down at submission.
        result_backend_transport_options={**transport, "retry_policy": FAST_RETRY},
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy=FAST_RETRY,
        worker_hijack_root_logger=False,
    )
    return app


class CeleryQueue:
    def __init__(self, settings: Settings):
        self.celery = make_celery(settings)
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=2,
                                           socket_connect_timeout=2)

    def submit(self, job_id: str) -> None:
        self.celery.send_task(TASK, args=[job_id])

    def depth(self) -> float:
        try:
            return self._redis.llen(QUEUE)
        except redis.RedisError:
            return float("nan")

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._redis.close()
        self.celery.close()


class EmbeddedQueue:
    """Child processes started with spawn (PyTorch never loads into the api process, and no
    ONNX Runtime thread pool is forked), recycled after N jobs like Celery's workers. Jobs left
    unfinished by a stopped api, or whose process died, are submitted again (their lease says
    whether and how often they may run again)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._closing = False
        self._outstanding: set[Future] = set()
        self._pool = self._new_pool()
        for job in JobStore.from_settings(settings).list():
            if job["state"] in ("queued", "running"):
                self.submit(job["id"])

    def _new_pool(self) -> ProcessPoolExecutor:
        s = self.settings
        return ProcessPoolExecutor(
            s.embedded_workers, mp_context=get_context("spawn"),
            initializer=tasks.init_process, initargs=(s.num_threads,),
            max_tasks_per_child=s.worker_max_tasks_per_child,
        )

    def submit(self, job_id: str) -> None:
        s = self.settings
        args = (tasks.run_job, job_id, s)
        try:
            future = self._pool.submit(*args)
        except BrokenProcessPool:  # a job process died (e.g. out of memory): start afresh
            self._pool = self._new_pool()
            future = self._pool.submit(*args)
        self._outstanding.add(future)
        future.add_done_callback(lambda f: self._done(job_id, f))

    def _done(self, job_id: str, future: Future) -> None:
        self._outstanding.discard(future)
        if self._closing or future.cancelled() or future.exception() is None:
            return
        exc = future.exception()
        log.error("job %s failed: %r", job_id, exc)
        if isinstance(exc, BrokenProcessPool):  # its process (or another's) died: run_job
            self.submit(job_id)                 # claims it again if its attempts allow

    def depth(self) -> int:
        return max(0, len(self._outstanding) - self.settings.embedded_workers)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        """Stop now: a running job is killed and runs again, from its inputs, at next start."""
        self._closing = True
        processes = list(self._pool._processes.values())  # no public way before Python 3.14
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.kill()


def make_queue(settings: Settings) -> CeleryQueue | EmbeddedQueue:
    return CeleryQueue(settings) if settings.redis_url else EmbeddedQueue(settings)


async def sweep_forever(jobs: JobStore, queue: CeleryQueue | EmbeddedQueue, every_s: float
                        ) -> None:
    """Queue again, every `every_s` seconds, the jobs whose runner was lost (the api's task)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            for job_id in await run_sync(jobs.sweep, queue.submit):
                log.warning("job %s lost its runner: queued again", job_id)
        except Exception as exc:  # the broker is down, say: the next sweep tries again
            log.error("job sweep failed: %r", exc)
