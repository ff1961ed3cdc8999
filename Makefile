# towerws: `make run` starts a development server, `make test` runs the whole suite.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= etc/towerws.conf

# Two stamps: `make run` installs what running needs (the package, the emit extra for
# towerws-publish and the client extra for `python -m websockets`, both in its banner);
# `make test` adds the test extras on top.
RUN_STAMP   := $(VENV)/.installed-run
TEST_STAMP  := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

# Broker-less (amqp_url none) when the environment says so, else when $(CONFIG) does:
# the banner then shows the console and the HTTP publish API, since towerws-publish
# goes to RabbitMQ and never reaches a broker-less node.
ifdef TOWERWS_AMQP_URL
AMQP_URL_SETTING := $(TOWERWS_AMQP_URL)
else
AMQP_URL_SETTING := $(shell sed -n 's/^[[:space:]]*amqp_url[[:space:]]*=//p' $(CONFIG) 2>/dev/null | tail -n 1)
endif
BROKERLESS := $(filter none None NONE,$(strip $(AMQP_URL_SETTING)))
PUBLISH_SECRET := $(or $(TOWERWS_PUBLISH_SECRET_FILE),etc/publish.dev.secret)
comma := ,

.PHONY: run banner test test-deps bench bench-quick soak clean

$(RUN_STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[emit,client]'
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -e '.[emit,client,test]'
	touch $(TEST_STAMP)

run: $(RUN_STAMP) banner
	exec $(VENV)/bin/twistd --nodaemon --pidfile= towerws --config $(CONFIG)

# What `make run` prints first: how to connect and how to publish.
banner:
	@echo "towerws development server on ws://localhost:8051/websocket/ (config $(CONFIG))$(if $(BROKERLESS),$(comma) broker-less: no RabbitMQ)"
	@echo "  WARNING: static tokens from etc/tokens.dev.json are for development only."
	@echo "  connect: $(VENV)/bin/python -m websockets 'ws://localhost:8051/websocket/?token=dev-token'"
	@echo "           then type: {\"groups\": {\"jobs\": [\"status_changed\"]}}"
ifeq ($(BROKERLESS),)
	@echo "  publish: $(VENV)/bin/towerws-publish jobs-status_changed '{\"status\": \"running\"}'"
else
	@echo "  console: http://localhost:8051/console (needs console = true, e.g. TOWERWS_CONSOLE=true)"
	@echo "  publish: curl -H \"Authorization: Bearer \$$(cat $(PUBLISH_SECRET))\" \\"
	@echo "                -d '{\"group\": \"jobs-status_changed\", \"payload\": {\"status\": \"running\"}}' http://localhost:8051/api/publish"
	@echo "           (needs publish_secret_file, e.g. TOWERWS_PUBLISH_SECRET_FILE=$(PUBLISH_SECRET);"
	@echo "           towerws-publish goes to RabbitMQ and never reaches a broker-less node)"
endif
	@echo "  watch:   curl localhost:8051/metrics   (and /healthz, /readyz)"

# The whole suite, against the real RabbitMQ: --start-broker starts the local one if
# nothing listens on 5672 (plain pytest without a broker runs the unit tests only).
test: $(TEST_STAMP) test-deps
	$(VENV)/bin/pytest --start-broker

# Debian packages the tests drive: nginx in front of towerws, Chromium for the browser tests
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
