# Two entry points, each doing its own set-up on a fresh machine:
#   make repro  -> virtual env + install + `dvc repro` on the embedded default (tiny model, bundled sample)
#   make test   -> virtual env + install + the test suite
#   make app    -> the web app on http://127.0.0.1:7860/ for the runs under stages/train (after make repro)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# dvc.yaml runs `python -m d2dprompt.pipeline.<stage>`: the venv must come first on PATH.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: repro test app bench ablate env clean restore

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[pipeline,app,test]"
	touch $@

repro: env
	$(RUN) dvc repro

test: env
	$(RUN) python -m pytest -q

# after a `dvc exp run` in the workspace (README): params.yaml, dvc.lock and metrics/ as committed (DVC stages them, so
# from HEAD); the outputs no stage of the committed pipeline writes removed (an experiment's other methods or datasets:
# compare hashes all of stages/evaluate, latents all of stages/download); the rest from DVC's cache. No env
# prerequisite: it runs in the environment the experiment ran in.
restore:
	git checkout HEAD -- params.yaml dvc.lock metrics
	@listed="$$($(RUN) dvc stage list --name-only)" && [ -n "$$listed" ] || exit 1; \
	keep() { echo "$$listed" | grep -qxE "$$1"; }; \
	for d in stages/download/* stages/train/* stages/checkpoints/train/* stages/evaluate/* stages/evaluate/*/* stages/compare/* metrics/*/*; do \
	  [ -e "$$d" ] || continue; n=$${d##*/}; n=$${n%.json}; n=$${n%.md}; p=$${d%/*}; p=$${p##*/}; \
	  case "$$d" in \
	    stages/download/*) keep "(folder|download)@$$n" ;; \
	    stages/train/*|stages/checkpoints/train/*) keep "train@$$n" ;; \
	    stages/evaluate/*/*) keep "evaluate@$$p-$$n" ;; \
	    stages/evaluate/*) keep "train@$$n" ;; \
	    stages/compare/*|metrics/compare/*) keep "compare@$$n" ;; \
	    metrics/*/*) keep "evaluate@$$p-$$n" ;; \
	  esac || { echo "removed $$d"; rm -rf "$$d"; }; done
	$(RUN) dvc checkout

# the web app (README "Use a trained detector"); e.g. make app ARGS="--port 8080"
app: env
	$(RUN) python -m d2dprompt.serve.app $(ARGS)

# the ablation study as DVC experiments (README "Ablations and seeds"); e.g. make ablate ARGS="--only baseline,no_dice --seeds 3"
ablate: env
	$(RUN) python -m d2dprompt.pipeline.ablate $(ARGS)

bench: env
	$(RUN) python -m d2dprompt.bench.steps
	$(RUN) python -m d2dprompt.bench.metrics

clean:
	rm -rf $(VENV) stages
