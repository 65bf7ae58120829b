# make demo : set up .venv and scan the embedded zoo model offline, with --compare-init
# make test : set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-studies bench mutation clean

# Set-up is quiet unless it fails; then the whole log is shown.
$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (log: $(VENV)-install.log) ..."
	@( $(PYTHON) -m venv $(VENV) && \
	   $(BIN)/pip install --quiet --upgrade pip && \
	   $(BIN)/pip install --quiet -e '.[test]' ) > $(VENV)-install.log 2>&1 \
	 || { cat $(VENV)-install.log; echo "set-up failed; the log is above and in $(VENV)-install.log"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hpa scan zoo:digits_cnn --compare-init --out demo-output
	@echo ""
	@echo "hpa is installed in $(VENV). To use it:  . $(VENV)/bin/activate  then  hpa --help"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# make test-studies : every built-in study of 'hpa reproduce' end to end on fixture data (about 10 minutes)
test-studies: $(STAMP)
	$(BIN)/python -m pytest -q -m studies tests/test_reproduce.py

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

# make mutation : the fixed list of mutants in tools/mutation.py, each on a copy of the tree; fails on a survivor
mutation: $(STAMP)
	$(BIN)/python tools/mutation.py

clean:
	rm -rf $(VENV) $(VENV)-install.log demo-output .pytest_cache
