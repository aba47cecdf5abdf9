PYTHON ?= python3

.PHONY: setup demo test bench bench-cil

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# Main job on the embedded default data: generate + prepare avdigits, train CIGN on all tasks,
# print the results table.
demo: setup
	cign-prepare --dataset avdigits
	cign-train

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/bench_data.py
	$(PYTHON) benchmarks/bench_train.py

# CIGN against fine-tuning on avdigits, 3 seeds (about 35 min on 2 cores)
bench-cil: setup
	$(PYTHON) benchmarks/bench_cil.py
