# The two front-door commands (README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARTIFACTS ?= artifacts

.PHONY: demo test install clean

$(BIN)/slimrec: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $@

install: $(BIN)/slimrec

# Main job on the default data: fetch MovieLens-100K, train the teacher, compress, compare.
demo: install
	$(BIN)/slimrec demo --out $(ARTIFACTS)

# The test suite CI runs; the real MovieLens-100K is read from ../shared/data.
test: install
	SLIMREC_DATA_DIR=$${SLIMREC_DATA_DIR:-../shared/data} $(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(ARTIFACTS)
