# The whole set-up is `make demo` or `make test`: each creates .venv when missing and installs into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export WANDB_MODE ?= offline
export RAY_AUTH_MODE ?= disabled

.PHONY: install ops demo demo-sessions demo-dpo test lint lock bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP) ops
	$(BIN)/cbt-llm synth template --config configs/demo-cpu.yaml
	$(BIN)/cbt-llm tokenizer train --config configs/demo-cpu.yaml
	$(BIN)/cbt-llm prepare --config configs/demo-cpu.yaml
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m cbt_llm.cli train --config configs/demo-cpu.yaml
	$(BIN)/cbt-llm export --run $(RUN)/train --out $(RUN)/export
	@echo ""
	@echo "demo trained (synth -> prepare -> train (ZeRO-3, full fine-tuning, 2 CPU ranks) -> export):"
	@echo "  corpus:          $(RUN)/corpus/"
	@echo "  packed shards:   $(RUN)/data/ (manifest.json, rejects/)"
	@echo "  model:           $(RUN)/export/"
	@echo "  metrics:         $(RUN)/train/metrics.jsonl, $(RUN)/train/train_summary.json"
	@echo "  loss curves:     $(RUN)/train/loss.png"
	@echo "  W&B offline run: $(RUN)/train/wandb/ (wandb sync to upload)"
	@echo ""
	@echo "eval: the untrained base model against the fine-tuned one on 32 held-out questions (configs/eval/demo.yaml)"
	$(BIN)/cbt-llm eval --config configs/eval/demo.yaml
	@echo ""
	@echo "talk to the demo model (through the crisis guard): $(BIN)/cbt-llm chat --model $(RUN)/export"
	@echo "or serve it (OpenAI-compatible, loopback): $(BIN)/cbt-llm serve --model $(RUN)/export, then cbt-llm chat --url http://127.0.0.1:8000/v1"

# the demo on multi-turn sessions: every counsellor turn learned, long sessions split on turn boundaries
demo-sessions: $(STAMP) ops
	$(BIN)/cbt-llm synth template --config configs/demo-sessions.yaml
	$(BIN)/cbt-llm tokenizer train --config configs/demo-sessions.yaml
	$(BIN)/cbt-llm prepare --config configs/demo-sessions.yaml
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m cbt_llm.cli train --config configs/demo-sessions.yaml
	$(BIN)/cbt-llm export --run runs/demo-sessions/train --out runs/demo-sessions/export
	$(BIN)/cbt-llm eval --config configs/demo-sessions.yaml --sessions
	@echo ""
	@echo "sessions demo: runs/demo-sessions/data/manifest.json (counts.split_sessions, split_pieces),"
	@echo "  runs/demo-sessions/train/metrics.jsonl, runs/demo-sessions/eval/ (report.md, sessions.jsonl)"

# preference optimisation: SFT on a corpus with flawed answers (configs/demo-dpo-sft.yaml), then DPO of that model on
# template pairs under ZeRO-3 on 2 CPU ranks (configs/demo-dpo.yaml), then both on held-out questions and pairs
demo-dpo: $(STAMP) ops
	$(BIN)/cbt-llm synth template --config configs/demo-dpo-sft.yaml
	$(BIN)/cbt-llm tokenizer train --config configs/demo-dpo-sft.yaml
	$(BIN)/cbt-llm prepare --config configs/demo-dpo-sft.yaml
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m cbt_llm.cli train --config configs/demo-dpo-sft.yaml
	$(BIN)/cbt-llm export --run runs/demo-dpo/train-sft --out runs/demo-dpo/export-sft
	$(BIN)/cbt-llm synth template --config configs/demo-dpo.yaml
	$(BIN)/cbt-llm prepare --config configs/demo-dpo.yaml
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m cbt_llm.cli train --config configs/demo-dpo.yaml
	$(BIN)/cbt-llm export --run runs/demo-dpo/train-dpo --out runs/demo-dpo/export-dpo
	@echo ""
	@echo "eval: the SFT model against its DPO on held-out questions (crisis questions among them) and held-out pairs"
	$(BIN)/cbt-llm eval --config configs/demo-dpo.yaml
	@echo ""
	@echo "demo-dpo: runs/demo-dpo/ (corpus with flawed answers, pairs/, train-sft/ and train-dpo/ metrics.jsonl,"
	@echo "  export-sft/, export-dpo/, eval/report.md and preference.jsonl); bench/RESULTS.md, \"make demo-dpo\""

# DeepSpeed JIT-compiles a shared-memory comm op for CPU ranks; build it once here, not in parallel tests
ops: $(STAMP)
	$(BIN)/python -c "from train.runtime import prebuild_ops; prebuild_ops()"

test: $(STAMP) ops
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# ruff (pinned in constraints.txt, configured in pyproject.toml): both checks run, either failing fails
lint: $(STAMP)
	$(BIN)/ruff check . ; rc=$$?; $(BIN)/ruff format --check . || rc=1; exit $$rc

bench: $(STAMP)
	$(BIN)/python bench/synth_bench.py
	$(BIN)/python bench/agents_bench.py
	$(BIN)/python bench/packing_bench.py
	$(BIN)/python bench/prepare_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/loss_memory_bench.py
	$(BIN)/python bench/structure_bench.py
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'  # TRL, for the DPO comparison
	$(BIN)/python bench/dpo_bench.py

# Regenerate constraints.txt from the current venv (after changing dependencies in pyproject.toml).
lock: $(STAMP)
	{ echo "# Pinned versions for a reproducible install: pip install -c constraints.txt ..."; \
	  echo "# torch is installed first from the CPU wheel (torch==2.13.0); regenerate with: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -e '^torch==' ; echo "torch==2.13.0"; \
	  grep -e '^flash-attn==' -e '^liger-kernel==' constraints.txt; } > constraints.txt.new  # the GPU extra: not installed here
	mv constraints.txt.new constraints.txt

clean:
	rm -rf runs .pytest_cache
