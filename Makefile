# The two commands the README opens with. Each sets up .venv first (once; again when pyproject.toml, TORCH or PYIQA
# changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch comes first and on its own: override TORCH for your CUDA build, e.g.
#   make demo TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH ?= torch==2.14.1 torchvision==0.29.1
# The tests' reference, without its dependencies (pyproject.toml's dev extra says why).
PYIQA := "pyiqa>=0.1.13,<0.2"
DEMO_DATA := runs/demo-data

.PHONY: demo test setup clean constraints FORCE

setup: $(VENV)/.installed

# The torch and pyiqa asked for, and pip's constraints file if any, rewritten only when they change: another TORCH=
# or PIP_CONSTRAINT= installs again, as pyproject.toml and the constraints file's contents do.
$(VENV)/.asked: FORCE
	@mkdir -p $(VENV)
	@echo '$(strip $(TORCH) $(PYIQA) $(PIP_CONSTRAINT))' | cmp -s - $@ || echo '$(strip $(TORCH) $(PYIQA) $(PIP_CONSTRAINT))' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.asked $(PIP_CONSTRAINT)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(PYIQA)
	touch $@

# Demo data -> shards -> training on 2 CPU processes (gloo) -> results, MLflow store, a few scored photos.
demo: setup
	$(PY) -m temu_dist.demo_data --out $(DEMO_DATA)
	$(PY) -m temu_dist.pack --dataset kadid10k --root $(DEMO_DATA) --out shards/demo --shard-size 20
	$(PY) -m temu_dist.pack --verify shards/demo
	ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch --config_file launch/cpu2.yaml \
		-m temu_dist.train --config configs/demo.yaml
	$(PY) -m temu_dist.predict --checkpoint runs/demo --heatmap runs/demo/heatmaps $(DEMO_DATA)/images/I01_*_0[15].png

# DeepSpeed compiles its CPU shared-memory op with g++ on first use (about 100 CPU-seconds): before the tests, not
# inside the DeepSpeed test. Into the venv, not torch's folder in ~/.cache, which another venv would build over; once
# built, loading it again only checks it.
test: export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
test: setup
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load()"
	$(PY) -m pytest -q

# The versions the tests last passed with, which CI installs (.ci/run): torch, torchvision and the CUDA wheels
# torch brings are left to TORCH, pip's own tools to pip. After a change of TORCH's default, run it again (torch's
# other dependencies, sympy or filelock, are pinned here).
constraints: setup
	{ echo '# make constraints: the versions in .venv (Python $(shell $(PY) -c "import platform; print(platform.python_version())")), which CI installs.'; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|pip|setuptools|wheel)=='; } > $@.txt

# What the demo wrote, and the venv; not all of runs/, every config's out_dir, whose mlflow.db is every run's store.
clean:
	rm -rf $(VENV) $(DEMO_DATA) runs/demo shards/demo
