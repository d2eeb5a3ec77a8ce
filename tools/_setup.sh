# Sourced by tools/demo and tools/test: use the active virtual environment, or make .venv, and install edgeprune
# with its test tools. pip finds torch==2.13.0's CPU build on this machine; see the README for other machines.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
