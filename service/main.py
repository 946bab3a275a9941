"""The api process's entry point: `uvicorn byorl.service.main:app` (settings from BYORL_*
environment variables). The app itself is built in `api/app.py`; the Celery worker's entry point
is `worker.py`."""

from byorl.service.api.app import create_app

app = create_app()
