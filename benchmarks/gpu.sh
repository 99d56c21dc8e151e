#!/usr/bin/env bash
# The GPU checks in one go (figures in docs/gpu.md): fp32 batch-128 inference throughput of MobileNetV2-1.4
# dense vs patterns A-F (unmerged and merged), training images/s of the engine vs a bare loop (fp32, and
# bf16 + channels_last), and, given a folder of deployed checkpoints (dense.pt plus one <cell>.pt each, e.g.
# copies of results/*/*/*/merged.pt), the pipeline's own bench-device stage on each.
#
#   bash benchmarks/gpu.sh OUTDIR [CELLS_DIR]     (PYTHON=... chooses the interpreter; STEPS="cells" only that part)
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUTDIR [CELLS_DIR]}
cells=${2:-}
py=${PYTHON:-python3}
steps=${STEPS:-merge engine cells}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"

$py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
if [[ $steps == *merge* ]]; then
    $py benchmarks/bench_merge.py --gpu --repeats 5 | tee "$out/merge_gpu.md"
fi
if [[ $steps == *engine* ]]; then
    for mode in "" "--amp bf16 --channels-last"; do
        # shellcheck disable=SC2086
        $py benchmarks/bench_engine.py --synthetic 4096 --image-size 224 --batch 128 --repeats 5 --threads 8 $mode
    done 2>&1 | grep -v "^engine" | tee "$out/engine_gpu.txt"
fi
if [[ $steps == *cells* && -n $cells ]]; then
    tmp=$(mktemp -d)
    for model in "$cells"/*.pt; do
        name=$(basename "$model" .pt)
        $py -m depthshrinker.cli bench-device --config config/config.yaml --model "$model" \
            --dense "$cells/dense.pt" --out "$tmp/$name.json"
    done
    $py - "$tmp" "$out/cells_gpu.json" <<'EOF'
import json, sys
from pathlib import Path
rows = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
for name, r in rows.items():
    print(name, {k: round(v, 2) for k, v in r.items() if k.startswith(("gpu_throughput_img", "gpu_speedup"))})
EOF
fi
