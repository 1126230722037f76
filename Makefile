# The two front-door commands (README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARTIFACTS ?= artifacts
# Type-checked packages (mypy); the rest are linted.
TYPED  := slimrec.artifact slimrec.serving slimrec.compression slimrec.experiment

.PHONY: demo test lint typecheck install clean

$(BIN)/slimrec: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $@

install: $(BIN)/slimrec

# Main job on the default data: fetch MovieLens-100K, train the teacher, compress, compare.
demo: install
	$(BIN)/slimrec demo --out $(ARTIFACTS)

# The test command CI runs: lint, type check, then the suite (MovieLens-100K from ../shared/data).
test: lint typecheck
	SLIMREC_DATA_DIR=$${SLIMREC_DATA_DIR:-../shared/data} $(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy resolves modules by path: link the folders under the names they install as.
typecheck: install
	rm -rf .typecheck && mkdir -p .typecheck/slimrec
	for d in models compression artifact serving loadtest bench experiment; do ln -s ../../$$d .typecheck/slimrec/$$d; done
	for f in slimrec/*.py; do ln -s ../../$$f .typecheck/slimrec/; done
	$(BIN)/mypy --python-executable $(BIN)/python $(addprefix -p ,$(TYPED))

clean:
	rm -rf $(VENV) $(ARTIFACTS) .typecheck
