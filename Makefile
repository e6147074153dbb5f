# The two commands the README opens with. Each sets up .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch comes first and on its own: override TORCH for your CUDA build, e.g.
#   make demo TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO := runs/demo

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m temu_dist.demo_data --out $(DEMO)/data
	$(PY) -m temu_dist.pack --dataset kadid10k --root $(DEMO)/data --out shards/demo --shard-size 50
	$(PY) -m temu_dist.pack --verify shards/demo
	$(PY) -m temu_dist.predict --config configs/demo.yaml --heatmap $(DEMO)/heatmaps $(DEMO)/data/images/I0[1-3]_*_0[15].png

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs shards/demo
