# wrn-det: every target creates .venv when it is missing and installs the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wrn_det-installed
# two pytest workers (one per core), each taking whole test files so that module fixtures are built once
PYTEST_ARGS ?= -q -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install test demo bench clean help

help:
	@echo "make install   create $(VENV) and install wrn_det with its test and export extras"
	@echo "make demo      generate the shapes dataset, train WRN-FPN Faster R-CNN, evaluate, plot, draw its detections"
	@echo "make test      run the test suite"
	@echo "make bench     run the CPU benchmarks in benchmarks/"

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,export]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

# one OpenMP thread: on a small machine shared with other work, spinning threads cost more than they give
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/train_net.py --config-file configs/demo/shapes_wrn_frcnn.yaml
	$(PY) tools/plot_logs.py output/demo
	$(PY) tools/demo.py --config-file configs/demo/shapes_wrn_frcnn.yaml --input 'datasets/shapes/val/00000[0-7].jpg' \
		--output output/demo/predictions MODEL.WEIGHTS output/demo/model_final.pth

bench: $(STAMP)
	$(PY) benchmarks/cls_throughput.py
	$(PY) benchmarks/coco_eval.py
	$(PY) benchmarks/det_step.py --size 256 800
	$(PY) benchmarks/det_data.py
	$(PY) benchmarks/imagenet_data.py
	$(PY) benchmarks/memory.py

clean:
	rm -rf output build *.egg-info
