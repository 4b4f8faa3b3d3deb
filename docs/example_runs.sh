#!/usr/bin/env bash
# The README's example runs (experiments/e5e6_example.py: E5 + E6, three seeds each, smoke size, CPU)
# and their report. With --docs, also refreshes the README's figures under docs/ from the
# report, quantised to 256 colours to keep the repository small.
#
#   bash docs/example_runs.sh [RUNS_DIR [REPORT_DIR]] [--docs]
set -euo pipefail
docs=0
args=()
for a in "$@"; do
  if [[ "$a" == --docs ]]; then docs=1; else args+=("$a"); fi
done
runs=${args[0]:-runs/e56ex}
report=${args[1]:-reports/e56ex}
python launch.py --config experiments/e5e6_example.py --workdir "$runs"
python -m diffdyn.analysis report "$runs"/e56ex_* --out "$report"
if (( docs )); then
  python - "$report" <<'PY'
import sys
from PIL import Image
report = sys.argv[1]
for source, target in (("curvature_vs_step", "e5_e6_curvature_example"),
                       ("e6_vs_e5_spectral_density", "e5_e6_spectral_density_example"),
                       ("e6_vs_e5_precond_sharpness", "e5_e6_precond_sharpness_example")):
  image = Image.open(f"{report}/{source}.png").convert("RGB").quantize(colors=256)
  image.save(f"docs/{target}.png", optimize=True)
PY
fi
