# setup: the virtualenv with what `make run` needs: Python >= 3.11, no root, no system package.
# run: the service. test: adds the test-only tools (the `dev` extra; redis-server and
# docker-compose on PATH, which .ci/run apt-installs as root) and runs every test.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# System tools only the tests use: a real Redis for the end-to-end tests; the compose client
# that validates docker-compose.yml; Chromium for the demo page's browser test (Playwright
# drives it). Debian's package names are the same.
TEST_TOOLS := redis-server docker-compose chromium
# And one library: jemalloc, which the `byorl` command preloads for training (allocator.py).
# And PostgreSQL's server programs (a private server per test session: the shared-state tests),
# which Debian's postgresql package puts off PATH.
missing_test_tools = $(strip $(foreach t,$(TEST_TOOLS),$(if $(shell command -v $(t)),,$(t))) \
	$(if $(shell $(PYTHON) -c 'import ctypes.util; print(ctypes.util.find_library("jemalloc") or "")'),,libjemalloc2) \
	$(if $(shell command -v initdb)$(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql))

.PHONY: setup run test test-tools missing-test-tools mutate

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "make: needs Python >= 3.11 as '$(PYTHON)' (choose one: make PYTHON=python3.12 ...)" >&2; \
		exit 1; }
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "make: '$(PYTHON) -m venv' failed: Python's venv module is missing" \
			"(Debian/Ubuntu: the python3-venv package)" >&2; exit 1; }

setup: $(PY)
	$(PY) -m pip install -q -e '.[cpu,train,service]'

# The service on the bundled default encoder; jobs run in-process unless BYORL_REDIS_URL is set.
run: setup
	$(VENV)/bin/uvicorn byorl.service.main:app --host $(HOST) --port $(PORT)

test: test-tools setup
	$(PY) -m pip install -q -e '.[cpu,train,service,dev]'
	$(VENV)/bin/pytest

# Fails naming the TEST_TOOLS not on PATH.
test-tools:
	@test -z "$(missing_test_tools)" || { \
		echo "make test: missing system package(s): $(missing_test_tools) (Debian/Ubuntu:" \
			"apt-get install --no-install-recommends $(missing_test_tools); .ci/run installs" \
			"them as root)" >&2; exit 1; }

# The TEST_TOOLS not on PATH, space-separated (empty when all are there).
missing-test-tools:
	@echo $(missing_test_tools)

# Mutation testing (mutmut) of the method's core against the fast tests that pin it; not in CI
# (tens of minutes on 2 cores). One module: make mutate MUTANTS='training.optim*'.
EVAL_BOOKKEEPING := _suite* __check_budget* _attack_robust* \
	__zero_gradient_fraction* _large_eps* _evaluate_robustness* __evaluate__* _predict* \
	_library_attack* __multitargeted* ǁ_SuiteRunǁ* __correct_predictions* __attack_survivors* \
	__probe_ladder* __checks*
MUTANTS ?= training.byorl* training.optim* training.attacks* training.train* \
	$(addprefix training.evaluate.x,$(EVAL_BOOKKEEPING))
MUTMUT_JOBS ?= 1
mutate: setup
	$(PY) -m pip install -q -e '.[cpu,train,service,dev]'
	rm -rf mutants  # mutmut keeps stale test-coverage stats across test changes
	OMP_NUM_THREADS=1 nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTMUT_JOBS) $(foreach m,$(MUTANTS),'$(m)')
	$(VENV)/bin/mutmut results
