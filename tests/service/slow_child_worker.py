"""The service's Celery worker (`byorl.service.worker`) whose pool children take
BYORL_TEST_CHILD_START_S seconds more to start, as importing PyTorch in `worker_process_init`
does on a loaded machine (15-20 s measured): `celery -A tests.service.slow_child_worker worker`."""

import os
import time

from celery.signals import worker_process_init

from byorl.service.worker import app  # noqa: F401 (the app Celery's -A finds here)


@worker_process_init.connect
def _start_slowly(**_) -> None:
    time.sleep(float(os.environ["BYORL_TEST_CHILD_START_S"]))
