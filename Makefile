# setup: the virtualenv and the system tools the tests use; run: the service; test: everything.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test mutate

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

# Mutation testing (mutmut) of the method's core against the fast tests that pin it; not in CI
# (tens of minutes on 2 cores). One module: make mutate MUTANTS='training.optim*'.
EVAL_BOOKKEEPING := _margin_loss* ǁMultiTargetedǁ* _suite* __check_budget* __break* \
	__zero_gradient_fraction* _large_eps* _evaluate_robustness* __evaluate__* __predict* \
	__library* __multitargeted*
MUTANTS ?= training.byorl* training.optim* training.attacks* training.train* \
	$(addprefix training.evaluate.x,$(EVAL_BOOKKEEPING))
MUTMUT_JOBS ?= 1
mutate: setup
	rm -rf mutants  # mutmut keeps stale test-coverage stats across test changes
	OMP_NUM_THREADS=1 nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTMUT_JOBS) $(foreach m,$(MUTANTS),'$(m)')
	$(VENV)/bin/mutmut results
