#!/usr/bin/env bash
# The reproduction of every method's headline claim (docs/reproduction.md): nine `lorakit compare` runs (parts).
# Each is resumable: run this script again after an interruption and it continues where it stopped (finished runs
# are skipped, started ones resume from their last checkpoint). Outputs go to runs/claims-*; the committed copies of
# results.json, report.md and the plots live in docs/reproduction/<dataset>/. Each comparison also reuses its
# committed results.json (`lorakit compare --reuse`): on a fresh clone, without runs/, the finished runs are taken
# from it and only the missing ones train. REUSE="a.json b.json" adds further results files of the same settings.
#
#   bash docs/reproduction/run_claims.sh [PART ...]        (default: all, in order; the parts are listed in run())
#   REPORT_ONLY=1 bash docs/reproduction/run_claims.sh stdlib          (the report of what has finished; trains nothing)
#
# Budget on 2 CPU cores: uuid ~2 h in float32 (SmolLM2 trains at ~150 tokens/s here). stdlib trains with bf16 autocast
# (Accelerate), 1.7x faster than float32 on a CPU with AVX512-BF16 (~2.5 h) but ~28x slower than float32 on one
# without (AVX2 only: 91 s against 3.2 s a step, measured 2026-12-02), so it needs such a CPU. manpages trains in
# float32, the same on any CPU (it restarted so on 2026-12-02). On an AVX2 core it takes ~10 s a step and ~1.5 s per
# eval example, so its budget is 30 steps, sweeps of 10 steps and 32 eval examples: ~38 min per variant, ~4 h on 2
# cores (at 40 steps, 15-step sweeps and 48 eval examples it was ~61 min per variant, ~6.6 h). Two parts
# can run at once, one thread each (OMP_NUM_THREADS=1): together they do ~30% more than one part on two threads. So
# can two copies of the same part (each run is trained by one of them; the last to end writes the full report):
#   OMP_NUM_THREADS=1 bash docs/reproduction/run_claims.sh manpages &  OMP_NUM_THREADS=1 bash docs/reproduction/run_claims.sh manpages &
set -euo pipefail
cd "$(dirname "$0")/../.."
LORAKIT=${LORAKIT:-.venv/bin/lorakit}

# The thirteen: eight adapter methods, four procedures on LoRA, and the RITE optimizer on LoRA. LoRTA adapts
# q/k/v/o by design, so a LoRA on the same targets is its same-budget reference. Budgets where a paper sets one:
# LoRA-XS at r=16 (its main setting), MELoRA with 8 blocks of rank 2 (rank 16 at 1/8 of LoRA-16's parameters, as
# the paper compares), XGBLoRA with its rank-1 boosters, IncreLoRA at an average rank of 8 (its --rank is the
# budget; capacity 2·8 + 4 = 20 per module).
METHODS="lora,olora,mini,loraxs,melora:r=2:blocks=8,prolora,mora,lorta:targets=q_proj/k_proj/v_proj/o_proj"
METHODS+=",lora:targets=q_proj/k_proj/v_proj/o_proj"
METHODS+=",lora:procedure=flat,lora:procedure=cola/links=3,lora:procedure=xgblora/layers=8:r=1"
METHODS+=",lora:procedure=increlora:r=8,lora:optimizer=rite"

# LoRTA's sweep on stdlib-docstrings, from its documented 1e-3, reached its limit of 3 extensions at 8.1e-2, still
# the best rate (flagged lr_at_sweep_edge). So on manpages its grid starts there, and `lorta-high` continues the
# stdlib sweep upwards in a comparison of its own (a comparison's method list cannot change once it has started).
LORTA="lorta:targets=q_proj/k_proj/v_proj/o_proj"
LORTA_HIGH="$LORTA:lr-sweep=2.7e-2/8.1e-2/2.43e-1"
METHODS_MANPAGES=${METHODS/$LORTA,/$LORTA_HIGH,}
# XGBLoRA's stdlib sweep ended at its limit too (2.43e-2 still the best): stdlib-float32 sweeps it again, centred
# there (2.43e-2 came out best, an interior optimum).
XGBLORA_HIGH="lora:procedure=xgblora/layers=8:r=1:lr-sweep=8.1e-3/2.43e-2/7.29e-2"

# stdlib-docstrings in float32, for the variants the bf16 comparison could not finish on a CPU without AVX512-BF16
# (IncreLoRA, LoRA-RITE; 28x slower there in emulated bf16), with XGBLoRA's sweep centred on the edge its bf16 sweep
# reached, and LoRA as the reference measured in the same precision.
METHODS_FLOAT32="lora,lora:procedure=increlora:r=8,lora:optimizer=rite,$XGBLORA_HIGH"
# Two more sweeps ended at their limit, still the best at the top: IncreLoRA's in stdlib-float32 (2.43e-2) and
# MELoRA's in manpages (2.43e-2). `increlora-high` and `melora-high` continue them upwards, as lorta-high does.
INCRELORA_HIGH="lora:procedure=increlora:r=8:lr-sweep=2.43e-2/7.29e-2/2.187e-1"
MELORA_HIGH="melora:r=2:blocks=8:lr-sweep=8.1e-3/2.43e-2/7.29e-2"
# In manpages, XGBLoRA's and IncreLoRA's sweeps ended at that limit as well (2.43e-2): `manpages-high` centres both
# there.
MANPAGES_HIGH="$XGBLORA_HIGH,lora:procedure=increlora:r=8:lr-sweep=8.1e-3/2.43e-2/7.29e-2"

# report.md of the stdlib part opens with this (its 6 pending runs are the two variants that ran in float32).
STDLIB_NOTE="**IncreLoRA and LoRA-RITE ran in float32, in [stdlib-docstrings-float32](../stdlib-docstrings-float32/report.md)**"
STDLIB_NOTE+=" (with a float32 LoRA as their reference): on a CPU without AVX512-BF16 a bf16 step took 28x a float32"
STDLIB_NOTE+=" one, so their runs were never trained in this bf16 comparison. They are the 6 runs pending below;"
STDLIB_NOTE+=" every other variant has its 3 seeds here (docs/reproduction.md, phase 2)."

COMMON=(--lr-sweep auto --sweep-steps 15 --seeds 1,2,3 --batch-size 4 --eval-limit 48 --warmup 5 --rank 16)
STDLIB=(--steps 60 --max-length 128 --eval-every 15)  # with --precision bf16, or no in the float32 parts
MANPAGES=(--precision no --steps 30 --sweep-steps 10 --eval-limit 32 --max-length 256 --eval-every 10)

# --reuse of the committed results of a part (when there are any), and of the files in $REUSE
reuse() {
  local file
  for file in "docs/reproduction/$1/results.json" ${REUSE:-}; do
    if [ -f "$file" ]; then printf -- '--reuse\n%s\n' "$file"; fi
  done
}

# One comparison: `lorakit compare ARGS --out runs/claims-NAME`, reusing the committed results of DIR. Afterwards
# (finished, with failed runs, or REPORT_ONLY) its results.json, report.md and plots are copied to
# docs/reproduction/DIR/, the copies this repository commits.
compare() {
  local name=$1 dir=$2 code=0 file
  shift 2
  "$LORAKIT" compare ${REPORT_ONLY:+--report-only} "$@" $(reuse "$dir") --out "runs/claims-$name" || code=$?
  mkdir -p "docs/reproduction/$dir"
  for file in results.json report.md loss.png params.png pareto.png loss_vs_time.png; do
    if [ -f "runs/claims-$name/$file" ]; then cp "runs/claims-$name/$file" "docs/reproduction/$dir/$file"; fi
  done
  return "$code"
}

run() {
  case "$1" in
    uuid)  # MoRA's claim: memorisation; LoRA and MoRA at equal trained parameters (r=8), exact match
      compare uuid uuid-pairs --data uuid-pairs:n=64 --methods lora,mora --rank 8 --steps 160 --batch-size 8 \
        --lr-sweep auto --sweep-steps 40 --seeds 1,2,3 --eval-every 40 --warmup 10 ;;
    stdlib)
      compare stdlib stdlib-docstrings --data stdlib-docstrings --methods "$METHODS" "${COMMON[@]}" "${STDLIB[@]}" \
        --precision bf16 --note "$STDLIB_NOTE" ;;
    stdlib-float32)  # the same setting as stdlib but float32 (see METHODS_FLOAT32)
      compare stdlib-float32 stdlib-docstrings-float32 --data stdlib-docstrings --methods "$METHODS_FLOAT32" \
        "${COMMON[@]}" "${STDLIB[@]}" --precision no ;;
    manpages)
      compare manpages manpages-summaries --data manpages-summaries --methods "$METHODS_MANPAGES" "${COMMON[@]}" \
        "${MANPAGES[@]}" ;;
    # Sweeps continued above the edge their main comparison reached, each variant alone (a comparison's method list
    # cannot change once it has started).
    lorta-high)
      compare stdlib-lorta-high stdlib-docstrings-lorta-high --data stdlib-docstrings --methods "$LORTA_HIGH" \
        "${COMMON[@]}" "${STDLIB[@]}" --precision bf16 ;;
    increlora-high)
      compare stdlib-float32-increlora-high stdlib-docstrings-float32-increlora-high --data stdlib-docstrings \
        --methods "$INCRELORA_HIGH" "${COMMON[@]}" "${STDLIB[@]}" --precision no ;;
    melora-high)
      compare manpages-melora-high manpages-summaries-melora-high --data manpages-summaries --methods "$MELORA_HIGH" \
        "${COMMON[@]}" "${MANPAGES[@]}" ;;
    manpages-high)
      compare manpages-high manpages-summaries-high --data manpages-summaries --methods "$MANPAGES_HIGH" \
        "${COMMON[@]}" "${MANPAGES[@]}" ;;
    qlora)  # issue 25's quality goal: nf4 QLoRA's final eval loss within 2% of float32 LoRA's. One fixed rate for
      # both, the one stdlib-float32's sweep chose for LoRA (9e-4), so the two differ only in the base's quantization.
      compare qlora stdlib-docstrings-qlora --data stdlib-docstrings --methods lora,lora:quantize=nf4 --lr 9e-4 \
        --seeds 1,2,3 --batch-size 4 --eval-limit 48 --warmup 5 --rank 16 "${STDLIB[@]}" --precision no ;;
    qlora-schemes)  # the qlora part's setting on the two other bitsandbytes schemes, whose untrained bases lose less
      # than nf4's on this model (docs/reproduction/quantization_sensitivity_probe.py)
      compare qlora-schemes stdlib-docstrings-qlora-schemes --data stdlib-docstrings \
        --methods lora:quantize=fp4,lora:quantize=int8 --lr 9e-4 --seeds 1,2,3 --batch-size 4 --eval-limit 48 --warmup 5 \
        --rank 16 "${STDLIB[@]}" --precision no ;;
    *)
      echo "unknown part $1; use uuid, stdlib, stdlib-float32, manpages, lorta-high, increlora-high, melora-high," \
        "manpages-high, qlora or qlora-schemes" >&2
      exit 2 ;;
  esac
}

status=0
for part in "${@:-uuid stdlib stdlib-float32 manpages lorta-high increlora-high melora-high manpages-high}"; do
  for one in $part; do run "$one" || status=$?; done
done
exit "$status"
