PYTHON ?= python3

.PHONY: setup demo test report bench experiments bench-demo bench-default bench-export bench-live bench-latency bench-enroll bench-gpu

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# Main job on the embedded default data: generate + prepare avdigits, train CIGN on all tasks,
# print the results table, export the last task (fp32 + INT8 for onnxruntime CPU, parity-checked), then
# cign-live headless on 20 test clips (2 per class): the clip table, live accuracy and the latency summary.
# The tools run through $(PYTHON), so a virtual environment works activated or not (make PYTHON=venv/bin/python demo).
# A second `make demo` reuses the finished run (cign-train --reuse) and exports and runs it again.
demo: setup
	$(PYTHON) -m cign_train.cli.prepare --dataset avdigits
	$(PYTHON) -m cign_train.cli.train --reuse
	$(PYTHON) -m cign_export.cli --int8 --target cpu --run runs/avdigits-cign-seed0
	$(PYTHON) scripts/demo_live.py exports/avdigits-cign-seed0-task4 data

test: setup
	$(PYTHON) -m pytest -q

# README.md, docs/ and the studies' index: every table of numbers regenerated from benchmarks/results/*.json
report:
	$(PYTHON) benchmarks/report.py

bench: setup
	$(PYTHON) benchmarks/bench_data.py
	$(PYTHON) benchmarks/bench_train.py

# Export time, sizes, batch-1 latency per precision (cpu + paper shapes), accuracy of the default run's
# export (train it first: cign-train)
bench-export: setup
	$(PYTHON) benchmarks/bench_export.py

# cign-bench for the paper preset (K 100), the cpu preset and a trained avdigits export (if exported with
# cign-export --run runs/bench-default/native --task 4 --fp16 --int8 --target cpu --out exports/bench-native-task4), ~6 min
bench-latency: setup
	$(PYTHON) benchmarks/bench_latency.py

# The paper's tables and figures on avdigits, 3 seeds, val + test (cign-experiment; runs are shared and
# resumed, about 8 h on 2 cores from scratch; docs/cign-experiment.md)
experiments: setup
	for e in methods ablation depth tasks buffer tsne; do $(PYTHON) -m cign_train.cli.experiment $$e || exit 1; done

# cign-enroll against cign-train on the same shots: avdigits, 3 seeds, N = 1, 3, 5, 10 (trains its runs under
# runs/bench-enroll the first time, about 1.5 h on 2 cores; then minutes)
bench-enroll: setup
	$(PYTHON) benchmarks/bench_enroll.py

# wall time of make demo after set-up, per stage, native and on the AVX2 instruction set (CPUID mask), each
# run twice from an empty folder under runs/bench-demo (about 15 min)
bench-demo: setup
	$(PYTHON) benchmarks/bench_demo.py

# wall time of the default cign-train, native and on the AVX2 instruction set in fp32 (CPUID mask, or torch's libraries held to AVX2 where it cannot run; about 12 min)
bench-default: setup
	$(PYTHON) benchmarks/bench_default_run.py

# cign-live pipeline vs model-only latency on a UDP stream camera + PulseAudio microphone (60 s), then the
# 600 s soak (needs the demo's export: make demo)
bench-live: setup
	$(PYTHON) benchmarks/bench_live.py
	$(PYTHON) benchmarks/bench_live.py --soak 600

# Every GPU number in one run of at most 8 min on an H100 / H200 (benchmarks/gpu_check.py; --dry-run shows and checks
# the plan): cign-bench on the GPU backends for the paper preset and a trained avdigits export, the default cign-train
# on CUDA and its export, training throughput, the CUDA tests; writes benchmarks/results/gpu_*.json. SKIP_SETUP=1 runs
# it without set-up, on a machine without network (the wheels it lacks: scripts/gpu_wheels.sh)
bench-gpu: $(if $(SKIP_SETUP),,setup)
	$(PYTHON) benchmarks/gpu_check.py
