# setup: the virtualenv with what `make run` needs: Python >= 3.11, no root, no system package.
# run: the service. test: adds the test-only tools (the `dev` extra; redis-server and
# docker-compose on PATH, which .ci/run apt-installs as root) and runs every test.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# System tools only the tests use: a real Redis for the end-to-end tests; the compose client
# that validates docker-compose.yml. Debian's package names are the same.
TEST_TOOLS := redis-server docker-compose
missing_test_tools = $(strip $(foreach t,$(TEST_TOOLS),$(if $(shell command -v $(t)),,$(t))))

.PHONY: setup run test test-tools missing-test-tools

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "make: needs Python >= 3.11 as '$(PYTHON)' (choose one: make PYTHON=python3.12 ...)" >&2; \
		exit 1; }
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "make: '$(PYTHON) -m venv' failed: Python's venv module is missing" \
			"(Debian/Ubuntu: the python3-venv package)" >&2; exit 1; }

setup: $(PY)
	$(PY) -m pip install -q -e '.[train,service]'

# The service on the bundled default encoder; jobs run in-process unless BYORL_REDIS_URL is set.
run: setup
	$(VENV)/bin/uvicorn service.main:app --host $(HOST) --port $(PORT)

test: test-tools setup
	$(PY) -m pip install -q -e '.[train,service,dev]'
	$(VENV)/bin/pytest

# Fails naming the TEST_TOOLS not on PATH.
test-tools:
	@test -z "$(missing_test_tools)" || { \
		echo "make test: missing system tool(s) on PATH: $(missing_test_tools) (Debian/Ubuntu:" \
			"apt-get install --no-install-recommends $(missing_test_tools); .ci/run installs" \
			"them as root)" >&2; exit 1; }

# The TEST_TOOLS not on PATH, space-separated (empty when all are there).
missing-test-tools:
	@echo $(missing_test_tools)
