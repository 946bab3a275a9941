"""The Celery worker: `celery -A service.worker worker --concurrency 1` (settings from BYORL_*).

Each task is `service.tasks.run_job` on a job id; see `service.jobs.make_celery` for the
delivery guarantees. PyTorch is imported in the pool's child processes only, after the fork.
"""

from celery.signals import worker_process_init

from service import tasks
from service.jobs import TASK, make_celery
from service.settings import Settings

settings = Settings()
if not settings.redis_url:
    raise SystemExit("the worker needs BYORL_REDIS_URL (without it the api runs jobs itself)")
app = make_celery(settings)


@app.task(name=TASK)
def run_job(job_id: str) -> dict | None:
    return tasks.run_job(job_id, settings)


@worker_process_init.connect
def _init_process(**_) -> None:
    tasks.init_process(settings.num_threads)
