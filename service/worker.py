"""The Celery worker: `celery -A byorl.service.worker worker --concurrency 1` (settings: BYORL_*).

Each task is `jobs/tasks.py`'s `run_job` on a job id; see `jobs/queue.py`'s `make_celery` for
the delivery guarantees. PyTorch is imported in the pool's child processes only, after the fork
(the device jobs will run on is asked of it in a subprocess at start, and logged).
"""

import logging

from celery.signals import worker_process_init, worker_ready

from byorl.service.jobs import tasks
from byorl.service.jobs.queue import TASK, make_celery
from byorl.service.settings import Settings

settings = Settings()
if not settings.redis_url:
    raise SystemExit("the worker needs BYORL_REDIS_URL (without it the api runs jobs itself)")
try:
    device = tasks.job_device(settings.device)
except RuntimeError as e:
    raise SystemExit(f"worker: {e}") from None
app = make_celery(settings)


@app.task(name=TASK)
def run_job(job_id: str) -> dict | None:
    return tasks.run_job(job_id, settings)


@worker_process_init.connect
def _init_process(**_) -> None:
    tasks.init_process(settings.num_threads)


@worker_ready.connect
def _say_device(**_) -> None:
    logging.getLogger(__name__).info("jobs run on %s (BYORL_DEVICE=%s)", device, settings.device)
