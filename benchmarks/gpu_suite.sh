#!/usr/bin/env bash
# All GPU checks of the speed issue in ONE device call of at most 9 minutes.
#
# Prepare here first (a machine with PyPI):  bash benchmarks/prepare_gpu_wheels.sh   (fills .gpu/)
# Device call: run(command="bash benchmarks/gpu_suite.sh", carry=[".gpu"], timeout_s=560)
# CPU smoke test of every non-CUDA path:    SUITE_DEVICE=cpu SUITE_QUICK=1 OUT=/tmp/suite_out bash benchmarks/gpu_suite.sh
#
# Steps (each time-boxed with `timeout`; a failing step is logged and the suite goes on; every step is
# cut to what is left of SUITE_BUDGET_S, default 530 s on CUDA, so the summary always comes out):
#   0. setup: installs only the .gpu/wheels whose distribution is missing (into /tmp/gpu_suite_site,
#      nothing in the image is replaced); PYTHONPATH=src (fastmaml runs from the tree, `python -m
#      fastmaml.cli`); FASTMAML_DATA=.gpu/data/omniglot; nvidia-smi, torch and package versions; the
#      Omniglot zips are decoded into the cache in the background while steps 1-2 run.
#   1. CUDA correctness (pytest): the CUDA tests of test_precision/test_episodes/test_strategy/
#      test_core_gradients (-k cuda; none needs gymnasium); a failure is re-run once with
#      -W ignore::UserWarning, to tell a warning made an error (pyproject's filterwarnings=error) from a
#      wrong result.
#   2. Speed (compare, graphs): benchmarks/compare.py --device cuda --learn2learn reimpl (learn2learn
#      needs compiling and cannot be installed there; its re-implementation "learn2learn-style" is the
#      reference): all cases with the eager implementations -> compare_cuda.{json,png}; then, one case
#      per run, the compiled ones (fastmaml compile; fastmaml cudagraphs = compile_mode="reduce-overhead")
#      on the sinusoid and on Omniglot 5-way 1-shot -> compare_graphs_{sinusoid,omniglot}.json. Separate
#      runs, as compare.py writes its JSON at the end: a compile that crashes or hangs loses only its own.
#   3. Time to accuracy (train): the paper's Omniglot 5-way 1-shot run (task.queries=1, 60,000 iterations,
#      validation every 5,000 on 100 tasks, checkpoint every 1,000) for the time left, with CUDA graphs
#      if step 2's Omniglot numbers say they reach more iterations (SUITE_TRAIN_COMPILE=auto|1|0; a
#      compiled run that fails before its first checkpoint is re-run eager); then `fastmaml eval` of its
#      last checkpoint (paper protocol: 600 tasks, 1 query/class) in fp32 and in bf16
#      (meta.precision=bf16), and of the committed CPU-trained checkpoint (results/omniglot_5way1shot_cpu,
#      99.07% on CPU) in fp32 and bf16.
#   4. The four test files' other (CPU) tests under this torch, with the time left (rest).
#   5. Summary table (ms/step and ratios vs learn2learn-style, time to accuracy, steps), printed last
#      and written to $OUT/summary.md.
# Files in $OUT (7; at most 8 come back): suite.log (everything), summary.md, compare_cuda.json,
# compare_cuda.png, compare_graphs_sinusoid.json, compare_graphs_omniglot.json, tta.json (time to
# accuracy: settings, metrics, evaluations).
#
# Environment: SUITE_DEVICE (cuda|cpu), SUITE_QUICK=1 (tiny sizes), SUITE_BUDGET_S, SUITE_STEPS (sections
# to run, default "pytest compare graphs train rest"), SUITE_TRAIN_S (cap on training), SUITE_TRAIN_COMPILE
# (auto|1|0), SUITE_COMPILE_OVERRIDES (default "meta.compile=true meta.compile_mode=reduce-overhead"),
# SUITE_TAIL_S (seconds kept after training), SUITE_WORK (scratch, default /tmp/gpu_suite_work), OUT.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
SUITE_DEVICE=${SUITE_DEVICE:-cuda}
SUITE_QUICK=${SUITE_QUICK:-0}
OUT=${OUT:-/tmp/gpu_suite_out}
WORK=${SUITE_WORK:-/tmp/gpu_suite_work}
if [[ $SUITE_QUICK == 1 ]]; then BUDGET=${SUITE_BUDGET_S:-900}; else BUDGET=${SUITE_BUDGET_S:-530}; fi
SUMMARY_RESERVE=20   # seconds kept for the summary at the end
mkdir -p "$OUT"
case $(basename "$WORK") in  # it is wiped: only a folder of this suite's own
  *gpu_suite*) rm -rf "$WORK" ;;
  *) echo "SUITE_WORK must be a folder named *gpu_suite*; got $WORK" >&2; exit 2 ;;
esac
mkdir -p "$WORK"
STATUS=$WORK/status.tsv
: > "$STATUS"

if [[ $SUITE_DEVICE == cpu ]]; then
  PY=(nice -n 15 python3)   # a shared 2-core machine: low priority, one thread
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
else
  PY=(python3)
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_DISABLE=1
SITE=/tmp/gpu_suite_site
export PYTHONPATH=$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
if [[ -z ${FASTMAML_DATA:-} ]]; then
  FASTMAML_DATA=$ROOT/.gpu/data/omniglot
  [[ -d $FASTMAML_DATA || ! -d $ROOT/../shared/data/omniglot ]] || FASTMAML_DATA=$(cd "$ROOT/../shared/data/omniglot" && pwd)
fi
export FASTMAML_DATA

# want SECTION: whether SUITE_STEPS (default all: pytest compare graphs train rest) names it.
want() { [[ " ${SUITE_STEPS:-pytest compare graphs train rest} " == *" $1 "* ]]; }

# run_step NAME LIMIT_S CMD...: time-boxed to min(LIMIT_S, time left); status to $STATUS; returns CMD's code
# (99: skipped for lack of time).
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - SUMMARY_RESERVE))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "### [$name] SKIPPED: ${left} s left of the ${BUDGET} s budget"
    printf '%s\tskipped (no time left)\t0\n' "$name" >> "$STATUS"
    return 99
  fi
  echo
  echo "### [$name] start $(date -u +%T), t=${SECONDS}s, limit ${limit}s: $(printf "%q " "$@")"
  local start=$SECONDS rc state
  timeout -k 15 "$limit" "$@"
  rc=$?
  case $rc in
    0) state=ok ;;
    124 | 137) state="TIMEOUT (limit ${limit} s)" ;;
    *) state="FAILED (exit $rc)" ;;
  esac
  echo "### [$name] $state after $((SECONDS - start)) s"
  printf '%s\t%s\t%s\n' "$name" "$state" "$((SECONDS - start))" >> "$STATUS"
  return $rc
}

# time_to_accuracy RUN_DIR COMMITTED_DIR: train Omniglot 5-way 1-shot until the time left runs out, then evaluate.
time_to_accuracy() {
  local run=$1 committed=$2 quick=$SUITE_QUICK dev=$SUITE_DEVICE tail_s train_args eval_args=() eval_overrides=()
  if [[ $quick == 1 ]]; then
    # Far more iterations than fit: the run is always cut by `timeout`, as it will be on the GPU.
    train_args=(task.queries=1 "train.device=$dev" train.iterations=100000 train.meta_batch=4 train.val_every=4
                train.val_tasks=8 train.checkpoint_every=2 train.log_every=2 train.threads=1 eval.batch=8)
    eval_args=(--tasks 16 --steps 3)
    eval_overrides=(eval.batch=8)
    tail_s=${SUITE_TAIL_S:-150}
    SUITE_TRAIN_S=${SUITE_TRAIN_S:-40}
  else
    train_args=(task.queries=1 "train.device=$dev" train.iterations=60000 train.val_every=5000 train.val_tasks=100
                train.checkpoint_every=1000 train.log_every=100)
    tail_s=${SUITE_TAIL_S:-110}   # 4 evaluations, the remaining tests, slack
  fi
  if [[ -n ${DECODE_PID:-} ]]; then
    wait "$DECODE_PID"
    echo "== Omniglot decoded in the background: $(tail -1 "$WORK/decode.log")"
  fi
  local train_s=$((DEADLINE - SECONDS - SUMMARY_RESERVE - tail_s))
  [[ -n ${SUITE_TRAIN_S:-} ]] && ((SUITE_TRAIN_S < train_s)) && train_s=$SUITE_TRAIN_S
  local compile=${SUITE_TRAIN_COMPILE:-auto}
  if [[ $compile == auto && $dev == cuda ]]; then
    compile=$("${PY[@]}" - "$OUT/compare_graphs_omniglot.json" "$train_s" 2> "$WORK/train_decision" <<'EOF'
import json, sys
try:
    impls = json.load(open(sys.argv[1]))["cases"]["omniglot-5w1s"]["impls"]
    graphs, eager = impls["fastmaml cudagraphs"], impls["fastmaml auto"]
except (OSError, KeyError, ValueError) as error:
    print(f"train with CUDA graphs: no, as compare.py measured none on omniglot-5w1s ({type(error).__name__}: "
          f"{error})", file=sys.stderr)
    print(0)
    sys.exit()
budget = float(sys.argv[2]) - 15  # start-up and validation (the data was decoded in the background)
its_graphs = max(0.0, budget - 1.5 * graphs["warmup_s"]) / (graphs["ms_median"] / 1e3)
its_eager = max(0.0, budget) / (eager["ms_median"] / 1e3)
choice = int(its_graphs > its_eager)
print(f"train with CUDA graphs: {'yes' if choice else 'no'} (in ~{budget:.0f} s: ~{its_graphs:.0f} iterations with "
      f"graphs [{graphs['ms_median']:.1f} ms/step, {graphs['warmup_s']:.0f} s to compile] vs ~{its_eager:.0f} eager "
      f"[{eager['ms_median']:.1f} ms/step]; compare.py's step, not the trainer's)", file=sys.stderr)
print(choice)
EOF
)
  elif [[ $compile == auto ]]; then
    compile=0   # compiling the conv net takes minutes on a CPU
    echo "train with CUDA graphs: no (--device $dev)" > "$WORK/train_decision"
  else
    echo "train with CUDA graphs: $compile (SUITE_TRAIN_COMPILE)" > "$WORK/train_decision"
  fi
  cat "$WORK/train_decision"
  local compile_args=()
  # shellcheck disable=SC2206
  [[ $compile == 1 ]] && compile_args=(${SUITE_COMPILE_OVERRIDES:-meta.compile=true meta.compile_mode=reduce-overhead})
  echo "== time to accuracy: ${train_s} s for training, compile=$compile"
  printf '%s\n' "compile=$compile" "train_s=$train_s" > "$WORK/train_settings"
  local start=$SECONDS rc=0
  run_step train-omniglot-5w1s "$train_s" "${PY[@]}" -m fastmaml.cli train omniglot_5way1shot "${train_args[@]}" \
    "${compile_args[@]}" --run-dir "$run" --no-progress || rc=$?
  if ((rc != 0 && rc != 99 && rc != 124 && rc != 137)) && [[ $compile == 1 && ! -f $run/last.pt ]]; then
    echo "== the compiled run failed before its first checkpoint: training again without compile"
    echo "compiled_run_failed=1" >> "$WORK/train_settings"
    mv "$run" "$run.compiled_failed" 2> /dev/null
    train_s=$((train_s - (SECONDS - start)))
    start=$SECONDS
    run_step train-omniglot-5w1s-eager "$train_s" "${PY[@]}" -m fastmaml.cli train omniglot_5way1shot \
      "${train_args[@]}" --run-dir "$run" --no-progress
    echo "compile=0" >> "$WORK/train_settings"
  fi
  echo "train_wall_s=$((SECONDS - start))" >> "$WORK/train_settings"
  # eval overrides right after RUN_DIR: argparse takes no positionals after the options
  if [[ -f $run/last.pt ]]; then
    run_step eval-fp32 60 "${PY[@]}" -m fastmaml.cli eval "$run" "${eval_overrides[@]}" meta.compile=false \
      --checkpoint last --device "$dev" "${eval_args[@]}"
    run_step eval-bf16 60 "${PY[@]}" -m fastmaml.cli eval "$run" "${eval_overrides[@]}" meta.compile=false \
      meta.precision=bf16 --checkpoint last --device "$dev" "${eval_args[@]}" --name eval_bf16
  else
    echo "== no checkpoint in $run: nothing to evaluate"
  fi
  mkdir -p "$committed"
  cp results/omniglot_5way1shot_cpu/config.yaml results/omniglot_5way1shot_cpu/best.pt "$committed/"
  run_step eval-committed-fp32 50 "${PY[@]}" -m fastmaml.cli eval "$committed" "${eval_overrides[@]}" \
    --checkpoint best --device "$dev" "${eval_args[@]}" --name eval_fp32
  run_step eval-committed-bf16 50 "${PY[@]}" -m fastmaml.cli eval "$committed" "${eval_overrides[@]}" \
    meta.precision=bf16 --checkpoint best --device "$dev" "${eval_args[@]}" --name eval_bf16
}

main() {
  DEADLINE=$((SECONDS + BUDGET))
  local quick=$SUITE_QUICK dev=$SUITE_DEVICE
  echo "== gpu_suite: device=$dev quick=$quick budget=${BUDGET}s out=$OUT work=$WORK $(date -u +%FT%TZ)"
  echo "== repo: $(git log -1 --oneline 2>/dev/null || echo '?'); changed: $(git status --short 2>/dev/null | wc -l) file(s)"
  echo "== FASTMAML_DATA=$FASTMAML_DATA ($(ls "$FASTMAML_DATA" 2>/dev/null | tr '\n' ' '))"

  # ---- 0. setup ------------------------------------------------------------------------------
  if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "(no nvidia-smi)"; fi
  if [[ -d $ROOT/.gpu/wheels ]]; then
    local missing
    missing=$("${PY[@]}" - "$ROOT/.gpu/wheels" <<'EOF'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        md.distribution(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
    if [[ -n $missing ]]; then
      echo "== installing the missing: $(echo "$missing" | xargs -n1 basename | tr '\n' ' ')"
      # shellcheck disable=SC2086
      run_step pip-install 120 "${PY[@]}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --root-user-action=ignore --upgrade --target "$SITE" $missing
    else
      echo "== every wheel in .gpu/wheels is installed already"
    fi
  elif [[ $quick == 1 ]]; then
    echo "== no .gpu/wheels: pip install skipped (quick mode)"
  else
    echo "== WARNING: no .gpu/wheels (run benchmarks/prepare_gpu_wheels.sh here first and carry .gpu)"
  fi
  "${PY[@]}" - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
versions = []
for name in ("numpy", "pyyaml", "tqdm", "matplotlib", "pillow", "tensorboard", "protobuf", "pytest", "pytest-xdist",
             "higher", "learn2learn", "triton"):
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} -")
print("packages:", ", ".join(versions))
import fastmaml
print("fastmaml from", fastmaml.__file__)
EOF
  if [[ $dev == cuda ]] && ! "${PY[@]}" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "== ERROR: --device cuda but torch.cuda.is_available() is False; the CUDA steps will fail"
  fi
  if want train; then  # decode the Omniglot zips into the cache (~/.cache/fastmaml) while the benchmarks run
    timeout 300 "${PY[@]}" -m fastmaml.cli data omniglot --check "$FASTMAML_DATA" > "$WORK/decode.log" 2>&1 &
    DECODE_PID=$!
  fi

  # ---- 1. CUDA correctness -------------------------------------------------------------------
  local files=(tests/test_precision.py tests/test_episodes.py tests/test_strategy.py tests/test_core_gradients.py)
  if ! want pytest; then :
  elif run_step pytest-cuda 150 "${PY[@]}" -m pytest -q -rs -m "not slow" -k cuda "${files[@]}"; then :; else
    local rc=$?
    if ((rc != 99 && rc != 124 && rc != 137)); then
      run_step pytest-cuda-rerun-no-userwarning-error 90 "${PY[@]}" -m pytest -q -rs -m "not slow" --lf \
        -W ignore::UserWarning "${files[@]}"
    fi
  fi

  # ---- 2. speed --------------------------------------------------------------------------------
  # compare.py writes its JSON at the end, so the compiled implementations run apart from the eager ones,
  # one case per run: a compile that crashes or outlasts its limit loses only its own case.
  local common=(--device "$dev" --learn2learn reimpl --threads 1)
  local graph_impls=("fastmaml auto" "fastmaml compile" "fastmaml cudagraphs" learn2learn)
  local sizes=(--rounds 10 --warmup 3) eager_cases=() eager_impls=("fastmaml auto" "fastmaml vmap" "fastmaml loop"
                                                                  "torch.func loop" learn2learn higher)
  if [[ $quick == 1 ]]; then
    sizes=(--quick --no-memory)
    eager_cases=(--cases sinusoid omniglot-5w1s)
    eager_impls=("fastmaml auto" "torch.func loop" learn2learn higher)
  fi
  if want compare; then
    run_step compare-eager 150 "${PY[@]}" benchmarks/compare.py "${common[@]}" "${sizes[@]}" "${eager_cases[@]}" \
      --impls "${eager_impls[@]}" --json "$OUT/compare_cuda.json" --plot "$OUT/compare_cuda.png"
  fi
  if want graphs; then
    run_step compare-graphs-sinusoid 100 "${PY[@]}" benchmarks/compare.py "${common[@]}" "${sizes[@]}" \
      --cases sinusoid --impls "${graph_impls[@]}" --json "$OUT/compare_graphs_sinusoid.json"
    run_step compare-graphs-omniglot 150 "${PY[@]}" benchmarks/compare.py "${common[@]}" "${sizes[@]}" \
      --cases omniglot-5w1s --impls "${graph_impls[@]}" --json "$OUT/compare_graphs_omniglot.json"
  fi

  # ---- 3. time to accuracy -------------------------------------------------------------------
  local run=$WORK/omniglot_5way1shot committed=$WORK/committed_cpu_run
  if want train; then time_to_accuracy "$run" "$committed"; fi

  # ---- 4. the rest of the four test files (CPU tests, this torch) --------------------------------
  if ! want rest; then :
  elif [[ $quick == 1 ]]; then
    run_step pytest-rest 120 "${PY[@]}" -m pytest -q -x -m "not slow" tests/test_precision.py \
      -k "refused or config_keys"
  else
    local xdist=()
    "${PY[@]}" -c 'import xdist' 2> /dev/null && xdist=(-n 8)
    run_step pytest-rest 120 "${PY[@]}" -m pytest -q -x -m "not slow" -k "not cuda" "${xdist[@]}" "${files[@]}"
  fi

  # ---- 5. summary ------------------------------------------------------------------------------
  echo
  echo "### [summary] t=${SECONDS}s"
  SUITE_RUN=$run SUITE_COMMITTED=$committed SUITE_STATUS=$STATUS SUITE_SETTINGS=$WORK/train_settings \
    SUITE_DECISION=$WORK/train_decision SUITE_COMMITTED_REF=$ROOT/results/omniglot_5way1shot_cpu/eval.json \
    SUITE_LOG=$OUT/suite.log SUITE_OUT=$OUT SUITE_ELAPSED=$SECONDS timeout 60 "${PY[@]}" - <<'EOF'
import json, math, os, re
from pathlib import Path

out, run, committed = Path(os.environ["SUITE_OUT"]), Path(os.environ["SUITE_RUN"]), Path(os.environ["SUITE_COMMITTED"])
lines = []


def table(header, rows):
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    lines.append("")


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def acc(ev, steps):
    """'mean ± ci' (%) after `steps` inner steps (or the last evaluated) of an eval.json."""
    if not ev:
        return "n/a"
    curve = next(iter(ev["by_shots"].values()))["accuracy"]
    s = min(steps, len(curve["mean"]) - 1)
    return f"{100 * curve['mean'][s]:.2f} ± {100 * curve['ci95'][s]:.2f} ({s} st.)"


statuses = [line.split("\t") for line in Path(os.environ["SUITE_STATUS"]).read_text().splitlines() if line.strip()]
steps_run = {"compare_cuda" if s[0] == "compare-eager" else s[0].replace("compare-graphs-", "compare_graphs_")
             for s in statuses}
compares = [(name, load(out / f"{name}.json"))
            for name in ("compare_cuda", "compare_graphs_sinusoid", "compare_graphs_omniglot")]
log = Path(os.environ["SUITE_LOG"]).read_text(errors="replace") if Path(os.environ["SUITE_LOG"]).exists() else ""
torch_line = re.search(r"^python (\S+) .*\| torch (\S+) .*\| available: \w+ \| (.*)$", log, flags=re.M)
device = next((c["machine"].get("gpu") or c["machine"]["cpu"] for _, c in compares if c), None)
if torch_line:
    gpu = torch_line.group(3) if torch_line.group(3) != "-" else "no GPU"
    device = f"{device or gpu}; torch {torch_line.group(2)}, Python {torch_line.group(1)}"
lines.append(f"# GPU suite summary ({device})")
lines.append("")
lines.append("learn2learn is learn2learn-style, compare.py's re-implementation of its clone()/adapt() "
             "(learn2learn needs compiling and cannot be installed on the device machine).")
lines.append("")
rows = []
for name, c in compares:
    if not c:
        if name in steps_run:
            rows.append((name, "(no results: see the log)", "", "", "", "", ""))
        continue
    for case, r in c["cases"].items():
        impls = r["impls"]
        ref = impls.get("learn2learn") or impls.get("learn2learn-style")
        for label, i in impls.items():
            ratio = f"{i['ms_median'] / ref['ms_median']:.2f}x" if ref else "n/a"
            speedup = f"{ref['ms_median'] / i['ms_median']:.2f}x" if ref else "n/a"
            mem = "n/a" if i.get("peak_mib") is None else f"+{i['peak_mib']:.0f}"
            warm = "" if i.get("warmup_s") is None or label not in ("fastmaml compile", "fastmaml cudagraphs") \
                else f"{i['warmup_s']:.1f}"
            err = "n/a" if i.get("grad_rel_err") is None else f"{i['grad_rel_err']:.0e}"
            rows.append((f"{name}: {case}", label, f"{i['ms_median']:.2f}", ratio, speedup, mem, f"{warm} / {err}"))
lines.append("## ms per meta-training step (median; ratio = time / learn2learn's, speed-up = its inverse)")
lines.append("")
table(["run: case", "implementation", "ms/step", "vs l2l", "speed-up", "peak MiB", "compile s / grad err fp64"], rows)

skips = re.findall(r"skipping cudagraphs[^\n]*", log)
if skips:
    lines.append(f"**CUDA graphs were skipped {len(skips)} time(s)**: {skips[0][:300]}")
    lines.append("")

settings = dict(line.split("=", 1) for line in Path(os.environ["SUITE_SETTINGS"]).read_text().split()
                if "=" in line) if Path(os.environ["SUITE_SETTINGS"]).exists() else {}
metrics = []
if (run / "metrics.jsonl").exists():
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            metrics.append(json.loads(line))
        except ValueError:
            pass
train_logs = [m for m in metrics if "tasks_per_s" in m]
vals = [(m["step"], m["val_accuracy"]) for m in metrics if "val_accuracy" in m]
reached = max((m["step"] for m in metrics), default=0)
config = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
iters = re.search(r"^\s*iterations: (\d+)", config, flags=re.M)
iters = int(iters.group(1)) if iters else 60000
batch = re.search(r"^\s*meta_batch: (\d+)", config, flags=re.M)
batch = int(batch.group(1)) if batch else 32
prev, train_seconds = 0, 0.0
for m in train_logs:
    train_seconds += (m["step"] - prev) * batch / m["tasks_per_s"]
    prev = m["step"]
recent = train_logs[-5:]
its_per_s = (sum(m["tasks_per_s"] for m in recent) / len(recent) / batch) if recent else float("nan")
ev32, ev16 = load(run / "eval.json"), load(run / "eval_bf16.json")
cm32, cm16 = load(committed / "eval_fp32.json"), load(committed / "eval_bf16.json")
wall = float(settings.get("train_wall_s", "nan"))
lines.append("## Time to accuracy: Omniglot 5-way 1-shot (paper: 98.7 ± 0.4%, 60,000 iterations)")
lines.append("")
mode = "CUDA graphs (compile reduce-overhead)" if settings.get("compile") == "1" else "eager (no compile)"
if settings.get("compiled_run_failed"):
    mode += " (the compiled run failed first: see the log)"
projection = iters / its_per_s if its_per_s == its_per_s and its_per_s > 0 else float("nan")
decision = Path(os.environ["SUITE_DECISION"])
if decision.exists():
    lines.append(decision.read_text().strip().splitlines()[-1])
    lines.append("")
tasks = f"{ev32['tasks']} tasks, {ev32['queries']} query/class" if ev32 else "paper protocol"
table(["settings", "iterations reached", "train wall s", "iterations s (logged rates)", "it/s (last 5 logs)",
       "projected s for all", "val acc % (step)", f"test acc % fp32 ({tasks})", "same ckpt bf16", "ckpt step"],
      [(mode, f"{reached} / {iters}", f"{wall:.0f}", f"{train_seconds:.0f}", f"{its_per_s:.1f}",
        f"{projection:.0f}", ", ".join(f"{100 * a:.1f} ({s})" for s, a in vals[-6:]) or "n/a",
        f"{acc(ev32, 1)}; {acc(ev32, 3)}", f"{acc(ev16, 1)}; {acc(ev16, 3)}",
        ev32["checkpoint_step"] if ev32 else "n/a")])
cpu_ref = load(Path(os.environ["SUITE_COMMITTED_REF"]))
lines.append("The committed CPU-trained checkpoint (results/omniglot_5way1shot_cpu, best.pt), evaluated here in fp32 "
             "and bf16, beside its committed CPU evaluation:")
lines.append("")
table(["evaluation", "tasks", "1 step", "3 steps"],
      [(label, ev["tasks"] if ev else "n/a", acc(ev, 1), acc(ev, 3))
       for label, ev in (("committed eval.json (CPU)", cpu_ref), ("here, fp32", cm32), ("here, bf16", cm16))])

lines.append("## Steps")
lines.append("")
table(["step", "status", "s"], [(n, "stopped at its time limit (as planned)" if n.startswith("train") and
                                  st.startswith("TIMEOUT") else st, t) for n, st, t in statuses])
pytest_lines = re.findall(r"^=* ?(\d+ (?:passed|failed|error)[^\n]*?) ?=*$", log, flags=re.M)
if pytest_lines:
    lines.append("pytest: " + " | ".join(pytest_lines))
    lines.append("")
lines.append(f"suite wall time {os.environ['SUITE_ELAPSED']} s")
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
tta = {"settings": settings, "mode": mode, "iterations": iters, "reached": reached, "train_wall_s": wall,
       "train_step_seconds": train_seconds, "its_per_s_recent": its_per_s, "validation": vals, "metrics": metrics,
       "eval_fp32": ev32, "eval_bf16": ev16, "committed_eval_fp32": cm32, "committed_eval_bf16": cm16}


def finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


(out / "tta.json").write_text(json.dumps(finite(tta), indent=1))
print(text)
EOF
  echo "### [summary] done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

main 2>&1 | tee "$OUT/suite.log"
