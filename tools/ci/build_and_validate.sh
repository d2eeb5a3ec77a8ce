#!/usr/bin/env bash
# CI artifact build: build every target of the project config, validate each output, archive them.
#
#   tools/ci/build_and_validate.sh [OUT_DIR] [ARCHIVE_DIR]      (defaults: build, dist)
#
# Run from the project folder that holds edgeprune.toml (or [tool.edgeprune] in pyproject.toml). Exit 0 only when
# every target built, met its budget and validated; otherwise the first failing step's exit code (1: a budget or a
# validation not met, 2: bad input, 3: internal error). Each output folder is archived as ARCHIVE_DIR/<target>.tar.gz
# with its manifest.json, whether or not validation passed, so a failure can be inspected.
set -uo pipefail
out="${1:-build}"
archive="${2:-dist}"
status=0

edgeprune build --out "$out" --force --json > "$out.report.json" || status=$?

mkdir -p "$archive"
for folder in "$out"/*/; do
  [ -f "$folder/manifest.json" ] || continue
  name=$(basename "$folder")
  if edgeprune validate "$folder"; then
    echo "validated: $name"
  else
    code=$?
    echo "validation failed: $name" >&2
    [ "$status" -eq 0 ] && status=$code
  fi
  tar -czf "$archive/$name.tar.gz" -C "$out" "$name"
done
exit "$status"
