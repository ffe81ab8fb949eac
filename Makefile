# The two commands a new user needs (README): `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean

setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m hisam.cli run

test: setup
	bash scripts/test.sh

clean:
	rm -rf $(VENV) datasets artifacts reports runs hisam_pb
