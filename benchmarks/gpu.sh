#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, in one run on one GPU, with the image's own
# JAX, Optax, Flax and torch (jaxtrain from this checkout, no install needed).
#     bash benchmarks/gpu.sh OUT_DIR [adamw mfu breakdown optimizers compile]   (default: all)
# Each benchmark writes OUT_DIR/<name>.log; one failing does not stop the others.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [adamw mfu breakdown optimizers compile]}
shift
wanted=" ${*:-adamw mfu breakdown optimizers compile} "
out=$(mkdir -p "$out" && cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $py -c "import jax, jaxlib, optax, flax, orbax.checkpoint as oc, torch; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'optax', optax.__version__, 'flax', flax.__version__, 'torch', torch.__version__); print(jax.devices())"
} 2>&1 | tee "$out/versions.log"

run() {  # run NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1 || echo "== $name FAILED (exit $?)"
  tail -n 14 "$out/$name.log"
}

want() { [[ $wanted == *" $1 "* ]]; }
want adamw && run adamw 100 $py benchmarks/adamw_bandwidth.py --params 1e9 --runs 20
want adamw && run adamw_inner10 100 $py benchmarks/adamw_bandwidth.py --params 1e9 --runs 10 \
  --inner 10
want mfu && run mfu 200 $py benchmarks/mfu.py --gpt2-small --steps 10 --reps 5
want mfu && run mfu_batch32 150 $py benchmarks/mfu.py --gpt2-small --batch 32 --steps 10 --reps 3
want breakdown && (cd benchmarks && run breakdown 200 $py gpt_breakdown.py)
want optimizers && run optimizer_step 170 $py benchmarks/optimizer_step.py --runs 10 --inner 20
want rest && run optimizer_step_rest 100 $py benchmarks/optimizer_step.py --runs 10 --inner 20 \
  --only control_optax_adam,muon,schedule_free_adamw
want compile && run compile_time 400 $py benchmarks/compile_time.py
