#!/usr/bin/env bash
# Run every shipped workflow that works on the pack's embedded models and
# print what each one made. Sets up (or reuses) the project's virtual
# environment like scripts/run_tests.sh, then needs a ComfyUI checkout:
# COMFYUI_PATH, or this pack inside ComfyUI/custom_nodes.
# Usage: bash scripts/main_job.sh [--output DIR] [--server] [WORKFLOW.json ...]
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LOCO_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
python="$venv/bin/python"

"$python" -m pip install --quiet --disable-pip-version-check -e ".[test]"

if ! comfy_root="$("$python" -m harness.locate 2>&1)"; then
    echo "main job: $comfy_root" >&2
    echo "main job: for example: COMFYUI_PATH=/path/to/ComfyUI bash scripts/main_job.sh" >&2
    exit 2
fi

# ComfyUI's requirements minus the torch family, which is installed already.
# ComfyUI 0.3.64 imports requests without listing it in requirements.txt.
grep -v -E '^(torch|torchvision|torchaudio|torchsde)\b' "$comfy_root/requirements.txt" \
    > "$venv/comfyui-requirements.txt"
"$python" -m pip install --quiet --disable-pip-version-check \
    -r "$venv/comfyui-requirements.txt" torchsde requests

exec "$python" scripts/main_job.py "$@"
