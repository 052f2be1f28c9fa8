# `make run`: set up .venv (first time) and run the default federated job.
# `make test`: set up .venv (first time) and run the whole test suite.
# `make lint`: ruff and mypy on the packages (CI runs it before the tests).
PYTHON ?= python3.11
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	# nginx: the local fleet's gateway-facing front (engine.front=auto uses it when installed); as root on Debian
	-@command -v nginx >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 \
		|| apt-get install -y -q --no-install-recommends nginx-light >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends nginx-light >/dev/null 2>&1) \
		|| echo "note: nginx could not be installed; the local fleet runs without its front (the report says so)"
	# mosquitto: the MQTT broker the gateway's MQTT source is tested against (tests start their own, on loopback)
	-@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 \
		|| apt-get install -y -q --no-install-recommends mosquitto >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends mosquitto >/dev/null 2>&1) \
		|| echo "note: mosquitto could not be installed; the MQTT source tests are skipped"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	# torch first, pinned: the CPU build; any other spec pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[test]"
	$(VENV)/bin/pip install --no-deps openoa==3.2  # La Haute Borne SCADA zip only (task=energy_anomaly); never imported
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/iiotfl run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -v -rs --durations=20 $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	.ci/mypy

bench: $(STAMP)
	$(VENV)/bin/python bench/foundation.py
	$(VENV)/bin/python bench/links.py
	$(VENV)/bin/python bench/runtime.py
	$(VENV)/bin/python bench/privacy.py
	$(VENV)/bin/python bench/he.py
	$(VENV)/bin/python bench/use_cases.py
	$(VENV)/bin/python bench/scale.py
	$(VENV)/bin/python bench/security.py --front
	$(VENV)/bin/python bench/gateway.py
	$(VENV)/bin/python bench/compose.py  # root, Docker engine (docker/engine), debootstrap

clean:
	rm -rf $(VENV) runs multirun
