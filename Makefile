# setup: the virtualenv and the system tools the tests use; run: the service; test: everything.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test

setup:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[train,service,dev]'
	command -v redis-server >/dev/null && command -v docker-compose >/dev/null || \
		(apt-get update -q && apt-get install -y -q redis-server docker-compose)

# The service on the bundled default encoder; jobs run in-process unless BYORL_REDIS_URL is set.
run: setup
	$(VENV)/bin/uvicorn service.main:app --host $(HOST) --port $(PORT)

test: setup
	$(VENV)/bin/pytest
