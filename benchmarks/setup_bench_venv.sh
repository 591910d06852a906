#!/usr/bin/env bash
# mergekit 0.1.5 (the `bench` extra) in its own venv: it pins its own transformers/pydantic/etc.,
# so it stays out of taskvec's environment. CPU torch only: a plain `torch` would pull CUDA wheels.
set -euo pipefail
VENV=${1:-/tmp/venv-bench}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 mergekit==0.1.5
"$VENV/bin/python" - <<'PY'
import torch, importlib.metadata as md
assert torch.version.cuda is None, f"CUDA torch was installed ({torch.__version__}); reinstall the CPU build"
bad = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-")]
assert not bad, f"CUDA libraries pulled in: {bad}"
print("torch", torch.__version__, "| mergekit", md.version("mergekit"))
PY
echo "mergekit-yaml: $VENV/bin/mergekit-yaml"
