"""What several test files share: the golden oracle (golden.py), running `bnb` (bnb_process.py in a child
process, bnb_inprocess.py through main() here), generated models and inputs, the fuzzer.

tests/conftest.py puts tests/ on sys.path, so every test folder imports these as `helpers.<module>`, and so do
scripts/fuzz.py and bench/ (which put tests/ on sys.path themselves). A test module never imports another:
what two of them share lives here."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository's root (pyproject.toml, scripts/, bnbcli/)."""
