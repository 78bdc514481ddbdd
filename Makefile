# The two commands of the README:
#   make demo   set up .venv, then train + save + reload + use a sentiment adapter on the real MiniLM (offline)
#   make test   set up .venv and .venv-peer, then run the whole test suite (what .ci/run runs)
VENV      ?= .venv
PEER_VENV ?= .venv-peer
TRITON_NEW_VENV ?= .venv-triton-new
PY        := $(VENV)/bin/python
PEER_PY   := $(PEER_VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-main test-peer test-triton-new venv peer-venv triton-new-venv lint bench compile-cache

demo: venv
	$(PY) examples/train_sentiment.py $(ARGS)

test: venv peer-venv test-main test-peer test-triton-new

test-main: venv
	$(VENV)/bin/pytest -q -n 2 tests --ignore=tests/peer

# The kernel tier's interpreter tests on the newest supported Triton (a subset: every kernel, dtype and routing kind).
TRITON_NEW_TESTS := tests/kernels/test_bottleneck.py tests/kernels/test_multi.py tests/kernels/test_lora_kernels.py
TRITON_NEW_SELECT := shape-1x or shape-7x or 129x64x64 or 7x64x1 or 1x200x8 or 129x200x24x3 or per_sequence or all_rows or out_of_range or partial_gradients
test-triton-new: triton-new-venv
	$(TRITON_NEW_VENV)/bin/python -m pytest -q -p no:cacheprovider $(TRITON_NEW_TESTS) -k "$(TRITON_NEW_SELECT)"

test-peer: peer-venv
	$(PEER_VENV)/bin/pytest -q tests/peer -p no:cacheprovider

venv:
	VENV=$(VENV) scripts/make_venv.sh

peer-venv:
	VENV=$(PEER_VENV) scripts/make_peer_venv.sh

triton-new-venv: venv
	VENV=$(TRITON_NEW_VENV) MAIN_VENV=$(VENV) scripts/make_triton_new_venv.sh

# Recompile the kernel specialisations whose results are not cached and rewrite the committed cache (no GPU needed).
compile-cache: venv
	env -u TRITON_INTERPRET $(PY) -m fxadapt.kernels.compile_check --cache tests/kernels/compile_cache.json --update-cache

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check fxadapt tests kernels bench examples

bench: venv
	$(PY) bench/models.py
