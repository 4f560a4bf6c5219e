# The README's two commands: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo.mp4

.PHONY: install install-dev demo test lint typecheck unit browser clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/install.sh
	bash scripts/install.sh --dev $(VENV)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# A 480p, 81-frame text-to-video request through the service (`wanserve serve`) on the embedded
# defaults: SQLite queue, local file storage, the built-in tiny model.
demo: install
	$(BIN)/python scripts/demo.py -o $(DEMO_OUT)

# The official JS client for the compatibility tests (pinned in tests/js/package-lock.json).
tests/js/node_modules/.package-lock.json: tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund
	touch $@

lint: install-dev
	$(BIN)/ruff check wanserve tests scripts benchmarks
	$(BIN)/ruff format --check wanserve tests scripts benchmarks

typecheck: install-dev
	$(BIN)/mypy

# The playground tests drive Debian's Chromium (`apt-get install chromium`; .ci/run installs it).
browser:
	@command -v chromium >/dev/null || { echo "the playground tests need Chromium: apt-get install chromium" >&2; exit 1; }

unit: install-dev tests/js/node_modules/.package-lock.json browser
	$(BIN)/pytest --durations=15

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache tests/js/node_modules
