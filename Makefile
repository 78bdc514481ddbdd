# The two commands of the README:
#   make demo   set up .venv, then train + save + reload + use a sentiment adapter on the real MiniLM (offline)
#   make test   set up .venv and .venv-peer, then run the whole test suite (what .ci/run runs)
VENV      ?= .venv
PEER_VENV ?= .venv-peer
PY        := $(VENV)/bin/python
PEER_PY   := $(PEER_VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-main test-peer venv peer-venv lint bench

demo: venv
	$(PY) examples/train_sentiment.py $(ARGS)

test: venv peer-venv test-main test-peer

test-main: venv
	$(VENV)/bin/pytest -q tests --ignore=tests/peer

test-peer: peer-venv
	$(PEER_VENV)/bin/pytest -q tests/peer -p no:cacheprovider

venv:
	VENV=$(VENV) scripts/make_venv.sh

peer-venv:
	VENV=$(PEER_VENV) scripts/make_peer_venv.sh

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check fxadapt tests kernels bench examples

bench: venv
	$(PY) bench/models.py
