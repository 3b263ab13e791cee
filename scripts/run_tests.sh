#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment, install the pack with
# its test extra and run the whole suite. The ComfyUI tier runs when
# COMFYUI_PATH names a ComfyUI checkout or the pack sits in
# ComfyUI/custom_nodes; otherwise pytest skips it and prints why.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LOCO_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
python="$venv/bin/python"

"$python" -m pip install --quiet --disable-pip-version-check -e ".[test]"

comfy_root="$("$python" -m harness.locate 2>/dev/null || true)"
if [ -n "$comfy_root" ]; then
    # ComfyUI's requirements minus the torch family, which is installed already.
# ComfyUI 0.3.64 imports requests without listing it in requirements.txt.
    grep -v -E '^(torch|torchvision|torchaudio|torchsde)\b' "$comfy_root/requirements.txt" \
        > "$venv/comfyui-requirements.txt"
    "$python" -m pip install --quiet --disable-pip-version-check \
        -r "$venv/comfyui-requirements.txt" torchsde requests
fi

set +e
"$python" -m pytest "$@"
status=$?
set -e
# Exit code 5 means pytest collected no tests; with every tier skipped that
# is not a failure of the pack.
if [ "$status" -eq 5 ]; then
    exit 0
fi
exit "$status"
