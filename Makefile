# memtron entry points. `make demo` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
DATA   := runs/data/tiny
PYTEST_ARGS ?=

.PHONY: install install-dev demo data test lint bench bench-report clean

install:
	PYTHON=$(PYTHON) scripts/install.sh

install-dev:
	scripts/install-system.sh
	PYTHON=$(PYTHON) scripts/install.sh dev,megatron,deepspeed,mpi,serve,hf,eval,report,retrieval

# Regenerated when the generator (and so the demo corpus) changes. 1,000 questions per bucket
# (2,000 in all) keep the intervals at about +-2 points; the committed reference numbers
# (docs/quality-reference.json) were measured on exactly these questions.
$(DATA)/raw/train.jsonl: memtron/data/synthetic.py
	memtron data synth --out $(DATA) --questions-per-bucket 1000

# A 4,096-token BPE vocabulary trained on the corpus (deterministic): names become 1-3 tokens,
# which the memory query can see (docs/quality.md, round 4).
$(DATA)/bpe/tokenizer.json: $(DATA)/raw/train.jsonl
	memtron data tokenizer $(DATA)/raw/train.jsonl --out $(DATA)/bpe --vocab-size 4096

$(DATA)/bpe/%/index.json: $(DATA)/bpe/tokenizer.json
	memtron data prepare $(DATA)/raw/$*.jsonl --out $(DATA)/bpe/$* \
	    --tokenizer $(DATA)/bpe/tokenizer.json --seq-len 128

data: $(DATA)/bpe/train/index.json $(DATA)/bpe/valid/index.json

# The main job on the embedded default: tiny Memory+ model, generated facts corpus, CPU; then
# its fact accuracy per frequency bucket beside the committed equal-compute comparison.
demo: install
	$(MAKE) data
	memtron train --config configs/tiny-cpu.yaml --resume none
	@echo "--- fact accuracy per bucket, beside the committed reference arms, dense and memory (docs/quality.md):"
	memtron eval facts --ckpt runs/tiny-cpu --reference docs/quality-reference.json
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
