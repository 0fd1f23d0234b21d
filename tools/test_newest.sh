#!/usr/bin/env bash
# The suite against the newest release of every dependency, in a fresh venv: CI pins what it installs
# (constraints.txt), so a new upstream release cannot turn main red overnight; this is where such a release
# is met first. Run it before each submission; it prints which installed versions differ from the pins.
#   usage: tools/test_newest.sh [pytest args...]     (default: -q)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test,trt-rtx,genai,serve,ray"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0   # the local CPU build (a GPU machine installs the torch it wants instead)
"${pip[@]}" --upgrade --upgrade-strategy eager -e ".[$extras]"
echo "versions that differ from constraints.txt (pinned -> newest):"
"$work/venv/bin/python" -m pip freeze --exclude-editable | python3 -c '
import re, sys
pins = dict(l.strip().split("==", 1) for l in open("constraints.txt") if "==" in l and not l.startswith("#"))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {norm(k): v for k, v in pins.items()}
for line in sys.stdin:
    if "==" in line:
        name, ver = line.strip().split("==", 1)
        if norm(name) in pins and pins[norm(name)] != ver:
            print(f"  {name}: {pins[norm(name)]} -> {ver}")
'
"$work/venv/bin/python" -m pytest "${@:--q}"
