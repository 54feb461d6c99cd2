# memtron entry points. `make demo` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
DATA   := runs/data/tiny
PYTEST_ARGS ?=

.PHONY: install install-dev demo data test lint bench bench-report clean

install:
	PYTHON=$(PYTHON) scripts/install.sh

install-dev:
	scripts/install-system.sh
	PYTHON=$(PYTHON) scripts/install.sh dev,megatron,deepspeed,mpi,serve,hf,eval,report

$(DATA)/raw/train.jsonl:
	memtron data synth --out $(DATA)

$(DATA)/train/index.json: $(DATA)/raw/train.jsonl
	memtron data prepare $(DATA)/raw/train.jsonl --out $(DATA)/train --seq-len 128

$(DATA)/valid/index.json: $(DATA)/raw/train.jsonl
	memtron data prepare $(DATA)/raw/valid.jsonl --out $(DATA)/valid --seq-len 128

data: $(DATA)/train/index.json $(DATA)/valid/index.json

# The main job on the embedded default: tiny Memory+ model, generated facts corpus, CPU.
demo: install
	$(MAKE) data
	memtron train --config configs/tiny-cpu.yaml --resume none
	@echo "--- the trained model answers fact questions (greedy, KV cache):"
	memtron generate --ckpt runs/tiny-cpu --prompts $(DATA)/questions.jsonl --limit 3 \
	    --greedy --max-new-tokens 12

test: install-dev
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint:
	ruff check memtron tests bench

bench:
	PYTHON=$(PYTHON) scripts/install.sh bench
	$(PYTHON) bench/pkm_layer.py

# Every benchmark (quick sizes) + a small quality comparison -> docs/report/REPORT.md (< 20 min).
bench-report:
	PYTHON=$(PYTHON) scripts/install.sh bench,report
	memtron bench report --quick --out docs/report

clean:
	rm -rf runs
