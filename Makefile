# dpatia: the two commands a newcomer needs are `make demo` and `make test`.
# Every target bootstraps .venv from the pinned requirements.lock on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= etc/dpatia.ini

.PHONY: all test lint unit browser systemd-analyze run demo bench bench-dispatch lock clean

all: test

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	# compat mode: a .pth puts the checkout on sys.path, which is what lets Twisted's
	# plugin scan find twisted/plugins/dpatia_plugin.py (PEP 660 import hooks do not).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps \
		--no-build-isolation -e . --config-settings editable_mode=compat
	# Write Twisted's plugin cache now, as the installing user, so a read-only service
	# user never has to (and never logs a cache error).
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@touch $(STAMP)

test: $(STAMP) lint unit

lint: $(STAMP)
	$(BIN)/ruff check dpatia_daemon tests bench twisted
	$(BIN)/mypy

# Two pytest-xdist workers: the suite is mostly waiting on subprocesses and sockets,
# so two processes halve its wall time on a 2-core machine.  PYTEST_ARGS adds options.
PYTEST_WORKERS ?= 2
unit: $(STAMP) browser systemd-analyze
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The simulator's page is tested in Debian's headless Chromium.  Install it when this
# machine lets us (root with apt-get, as in CI); elsewhere that one test is skipped and
# says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the page test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed and cannot be installed here: the page test will be skipped"; fi; }

# tests/ops/test_units.py checks systemd/*.service and *.socket with systemd-analyze
# verify: installed the same way (Debian's systemd package), skipped elsewhere.
systemd-analyze:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's systemd for systemd-analyze verify"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; \
	  else echo "systemd-analyze is not installed and cannot be installed here: the unit-file test will be skipped"; fi; }

run: $(STAMP)
	$(BIN)/twistd --nodaemon --pidfile= dpatia --config $(CONFIG)

# The simulator and the daemon on $(CONFIG): register, analyse three slides, show the
# progress and results, write overlay PNGs to demo-out/, stop (< 2 min; see README).
# More: make demo DEMO_ARGS="--keep-running" (or --quick, --out DIR, --timeout S).
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/python -m dpatia_daemon.demo --config $(CONFIG) $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/ack.py
	$(BIN)/python bench/metrics.py

# Pickup latency and throughput of dispatch to workers, then 10 demo slides (~1 min).
bench-dispatch: $(STAMP)
	$(BIN)/python bench/dispatch.py --demo

# Re-pin every dependency from pyproject.toml (run after changing dependencies).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	( echo "# Pinned by 'make lock' from pyproject.toml; installed by every make target."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' ) > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
