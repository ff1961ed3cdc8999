# towerws: `make run` starts a development server, `make test` runs the whole suite.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= etc/towerws.conf

BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test test-deps bench bench-quick soak clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,emit]'
	touch $(STAMP)

run: $(STAMP)
	@echo "towerws development server on ws://localhost:8051/websocket/ (config $(CONFIG))"
	@echo "  WARNING: static tokens from etc/tokens.dev.json are for development only."
	@echo "  connect: $(VENV)/bin/python -m websockets 'ws://localhost:8051/websocket/?token=dev-token'"
	@echo "           then type: {\"groups\": {\"jobs\": [\"status_changed\"]}}"
	@echo "  publish: $(VENV)/bin/towerws-publish jobs-status_changed '{\"status\": \"running\"}'"
	@echo "  watch:   curl localhost:8051/metrics   (and /healthz, /readyz)"
	exec $(VENV)/bin/twistd --nodaemon --pidfile= towerws --config $(CONFIG)

# The suite needs a real RabbitMQ; tests/conftest.py starts the local one if needed.
test: $(STAMP) test-deps
	$(VENV)/bin/pytest

# Debian packages the tests drive: nginx in front of towerws, Chromium for the console
# (never a downloaded browser build). Installed only when missing; where that is
# impossible the tests that need them skip and say why.
test-deps:
	@command -v nginx >/dev/null || (apt-get update -q && apt-get install -y -q nginx) \
		|| echo "make test: nginx could not be installed; the nginx test will be skipped"
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) \
		|| echo "make test: chromium could not be installed; the browser test will be skipped"

# The benchmark suite (bench/README.md): about 10 minutes; writes bench/RESULTS.md,
# including a py-spy profile of the server on the fan-out path.
# Needs RabbitMQ on 127.0.0.1:5672 (started like for make test when it is installed).
bench: $(BENCH_STAMP)
	$(PY) -m bench.run --profile $(BENCH_ARGS)

# One run of each scenario at small sizes (a few minutes; numbers only indicative).
bench-quick: $(BENCH_STAMP)
	$(PY) -m bench.run --quick $(BENCH_ARGS)

# The soak (bench/README.md): one towerws under steady client churn for SOAK_MINUTES
# (default 30); fails if memory, open files, connections, groups or bindings keep growing.
# A run of 30 minutes or more writes bench/SOAK.md, a shorter one bench/logs/soak-short.md.
SOAK_MINUTES ?= 30
soak: $(BENCH_STAMP)
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

$(BENCH_STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
