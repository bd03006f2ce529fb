#!/usr/bin/env bash
# Correctness of the CUDA path, on a machine with a GPU (CI has none, so these are not tests):
#   1. train-sparse on CUDA, killed (-9) after its second epoch checkpoint, resumed once on the
#      GPU and once on the CPU; both finish, export and validate;
#   2. masked weights are exactly zero in the GPU-trained checkpoint; masks keep the budget;
#   3. what is bit-reproducible: two fresh GPU runs of the same pipeline, compared bit for bit.
# Usage: bench/gpu_checks.sh [PIPELINE [WORKDIR [--set KEY=VALUE ...]]]     (from the repository root)
set -euo pipefail
pipeline=${1:-pipelines/quickstart.yaml}
work=${2:-$(mktemp -d)}
shift $(( $# < 2 ? $# : 2 ))
name=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$pipeline")
dsr() { python3 -m dsrpipe "$@" "${extra[@]}" --no-progress; }
extra=("$@")
mkdir -p "$work"

echo "== 1. kill -9 after epoch 2 on CUDA, resume on CUDA and on CPU"
dsr train-sparse "$pipeline" --set device=cuda --out "$work/gpu" > "$work/first.log" 2>&1 &
pid=$!
until [ -f "$work/gpu/$name/train/metrics.jsonl" ] && [ "$(wc -l < "$work/gpu/$name/train/metrics.jsonl")" -ge 2 ]; do
  sleep 0.2
done
kill -9 $pid; wait $pid 2>/dev/null || true
cp -r "$work/gpu" "$work/cpu"
dsr run "$pipeline" --set device=cuda --out "$work/gpu" 2>&1 | grep -E "resuming|validate" | tail -2
dsr run "$pipeline" --set device=cpu --out "$work/cpu" 2>&1 | grep -E "resuming|validate" | tail -2

echo "== 2. masked weights are exactly zero after GPU training"
python3 - "$work/gpu/$name/train/final.pt" <<'PY'
import sys, torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
masks, model = ckpt["sparsifier"]["masks"], ckpt["model"]
nonzero_masked = sum(int(model[f"{n}.weight"][~m].count_nonzero()) for n, m in masks.items())
active = sum(int(m.sum()) for m in masks.values())
print(f"{len(masks)} sparse tensors, {active} active positions, {nonzero_masked} non-zero masked weights")
assert nonzero_masked == 0
PY

echo "== 3. two fresh GPU runs, bit for bit"
dsr train-sparse "$pipeline" --set device=cuda --out "$work/again" > /dev/null 2>&1
dsr train-sparse "$pipeline" --set device=cuda --out "$work/again2" > /dev/null 2>&1
python3 - "$work/again/$name/train/final.pt" "$work/again2/$name/train/final.pt" <<'PY'
import sys, torch
a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in sys.argv[1:])
same_weights = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
same_masks = all(torch.equal(a["sparsifier"]["masks"][k], b["sparsifier"]["masks"][k]) for k in a["sparsifier"]["masks"])
print(f"identical weights: {same_weights}; identical masks: {same_masks}; "
      f"final test top-1 {a['history'][-1]['test_top1']:.4f} vs {b['history'][-1]['test_top1']:.4f}")
PY
