# The README's two commands: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo.mp4

.PHONY: install install-dev demo test lint typecheck unit clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/install.sh
	bash scripts/install.sh --dev $(VENV)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# A 480p, 81-frame text-to-video generation with the built-in tiny model on the embedded defaults.
demo: install
	$(BIN)/wanserve generate "A red fox trots through fresh snow at dawn, cinematic" \
		--resolution 480p --num-inference-steps 4 --seed 42 -o $(DEMO_OUT)

lint: install-dev
	$(BIN)/ruff check wanserve tests
	$(BIN)/ruff format --check wanserve tests

typecheck: install-dev
	$(BIN)/mypy

unit: install-dev
	$(BIN)/pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
