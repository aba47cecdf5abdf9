PYTHON ?= python3

.PHONY: setup demo test bench bench-cil bench-export

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# Main job on the embedded default data: generate + prepare avdigits, train CIGN on all tasks,
# print the results table, export the last task (fp32 + INT8 for onnxruntime CPU, parity-checked), then
# cign-live headless on three test clips (JSON lines and the latency summary of each).
demo: setup
	cign-prepare --dataset avdigits
	cign-train
	cign-export --int8 --target cpu
	for clip in $$($(PYTHON) scripts/test_clips.py data/avdigits 3); do \
		cign-live --model exports/avdigits-cign-seed0-task4 --camera $$clip --mic $$clip --headless --no-realtime || exit 1; \
	done

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/bench_data.py
	$(PYTHON) benchmarks/bench_train.py

# Export time, sizes, batch-1 latency per precision (cpu + paper shapes), accuracy of the default run's
# export (train it first: cign-train)
bench-export: setup
	$(PYTHON) benchmarks/bench_export.py

# CIGN against fine-tuning on avdigits, 3 seeds (about 35 min on 2 cores)
bench-cil: setup
	$(PYTHON) benchmarks/bench_cil.py
