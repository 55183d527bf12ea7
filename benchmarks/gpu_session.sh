#!/usr/bin/env bash
# All GPU work of issue 5 in few device calls (see docs/benchmarks.md, section gpu-profile).
#   stage probe: GPU tests + per-kernel breakdown + a short profile (no model file needed)
#   stage defer: the deferred Nectar merge: kernel tests, in-step A/B and launch sweep, breakdown, short profile
#   stage sweep: launch parameters of the fused kernels (benchmarks/kernel_sweep.py)
#   stage setup: install, first half of the SmolLM2 GGUF (carry .carry/a and .whl)
#   stage kern:  GPU kernel tests, per-kernel breakdown (PDL on/off), short profile, in-step launch sweep
#   stage real:  second half (carry .carry/b): GPU fit timing, real-artifact parity incl. the CLI
#   stage profiles: the published profiles (both shapes) and per-kernel breakdowns
#   stage fitgpu: after setup (carry .carry/b): `nectar fit` on an empty then a warm Triton cache, the
#                 in-process stage breakdown (graphed vs eager fit heads), the CUDA fit tests
# Results go to $OUT (few files).
set -uo pipefail
stage=${1:?stage: probe|kern|defer|coldfit|sweep|partials|smol|setup|real|refit|fitgpu|profiles|fitdefault|quality|cli|noise|gpart|gemma}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
install() {
  python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .whl/gguf-*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
}
join_model() {  # join_model OUT PART...: the model file from its parts, once; via a temp file, so a failed
  [ -s "$1" ] && return 0  # cat never leaves an empty model behind for the next call
  local out=$1; shift
  cat "$@" > "$out.tmp" && mv "$out.tmp" "$out" || { rm -f "$out.tmp"; return 1; }
}
smol_model() { join_model /root/smol.gguf /root/parts/smol.part00 .carry/b/smol.part01; }
timed_fit() {  # timed_fit ART LOG [nectar fit options]: `nectar fit` of grep.txt on CUDA, wall time, no progress bars
  local art=$1 log=$2; shift 2
  /usr/bin/time -f "fit wall %e s" nectar fit /root/manuals/grep.txt --model /root/smol.gguf --device cuda --out "$art" "$@" \
    2>&1 | tr '\r' '\n' | grep -E -v '^[^|]*: +[0-9]{1,2}%\|' | tee "$log"
}
real_artifact_tests() {  # the real-artifact parity tests (CLI on the CUDA-graph step) on /root/grep.nectar
  NECTAR_TEST_ARTIFACT=/root/grep.nectar NECTAR_TEST_MODEL=/root/smol.gguf NECTAR_TEST_QUESTIONS=/root/manuals/grep.questions.jsonl \
    python3 -m pytest -q -p no:timeout tests/kernels/test_real_artifact.py tests/kernels/test_fused_decoder.py 2>&1 | tail -15 | tee "$OUT/tests.log"
}
quality_run() {  # quality_run MODEL: benchmarks/nectar_quality.py on $MANUALS with $QARGS (records in $OUT/q)
  mkdir -p "$OUT/q"
  python3 benchmarks/nectar_quality.py run --manuals "${MANUALS_DIR:-/root/manuals}" --model "$1" --device cuda --only "${MANUALS:?}" \
    --no-semantic ${QARGS:-} --out-dir "$OUT/q" 2>&1 | grep -v Warn | tee "$OUT/q.log"
}
case $stage in
probe)
  install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -m pytest -q -x tests/kernels 2>&1 | tail -15 | tee "$OUT/tests.log"
  python3 benchmarks/step_breakdown.py --shape smollm2-135m --n 1024 --batch 1 2>&1 | tee "$OUT/breakdown.log"
  python3 benchmarks/step_breakdown.py --shape llama3-8b --n 131072 --batch 1 2>&1 | tee -a "$OUT/breakdown.log"
  nectar profile --shape smollm2-135m --device cuda --n 1024,131072 --batch 1,16 --steps 100 --json "$OUT/smol.json" 2>&1 | tee "$OUT/profile.log"
  nectar profile --shape llama3-8b --device cuda --n 1024,131072 --batch 1,16 --steps 100 --json "$OUT/l8b.json" 2>&1 | tee -a "$OUT/profile.log"
  ;;
kern)  # kernel-level check after a kernel change: GPU tests, per-kernel breakdown (PDL on/off), short profile
  install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -m pytest -q -x -p no:timeout tests/kernels/test_triton.py tests/kernels/test_fused_decoder.py -k "${TESTS_K:-}" 2>&1 | tail -15 | tee "$OUT/tests.log"
  python3 benchmarks/step_breakdown.py --shape smollm2-135m --n 1024 --batch 1 2>&1 | tee "$OUT/breakdown.log"
  NECTAR_PDL=0 python3 benchmarks/step_breakdown.py --shape smollm2-135m --n 1024 --batch 1 --methods nectar 2>&1 | tee -a "$OUT/breakdown.log"
  nectar profile --shape smollm2-135m --device cuda --n 1024,131072 --batch 1,16 --steps 100 --json "$OUT/smol.json" 2>&1 | tee "$OUT/profile.log"
  python3 benchmarks/step_breakdown.py --shape smollm2-135m --n 131072 --batch 1 --methods full 2>&1 | tee -a "$OUT/breakdown.log"
  python3 benchmarks/step_sweep.py 2>&1 | tee "$OUT/step_sweep.log"
  python3 benchmarks/probe_gen.py 2>&1 | grep -v Warn | tee "$OUT/probe_gen.log"
  ;;
defer)  # the deferred merge: GPU kernel tests, in-step A/B against the merge inside the kernel, breakdown, short profile
  install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -m pytest -q -x -p no:timeout tests/kernels/test_triton.py tests/kernels/test_fused_decoder.py 2>&1 | tail -15 | tee "$OUT/tests.log"
  python3 benchmarks/step_sweep.py --names "default,DEFERRED,deferred" --repeat ${REPEAT:-3} 2>&1 | grep -v Warn | tee "$OUT/step_sweep.log"
  python3 benchmarks/step_breakdown.py --shape smollm2-135m --n 1024 --batch 1 --methods nectar 2>&1 | grep -v Warn | tee "$OUT/breakdown.log"
  nectar profile --shape smollm2-135m --device cuda --n 1024,131072 --batch 1,16 --steps 200 --json "$OUT/smol.json" 2>&1 | tee "$OUT/profile.log"
  ;;
sweep)
  install
  python3 benchmarks/kernel_sweep.py 2>&1 | tee "$OUT/sweep.log"
  nectar profile --shape smollm2-135m --device cuda --n 1024,131072 --batch 1 --steps 100 --json "$OUT/smol.json" 2>&1 | tee "$OUT/profile.log"
  ;;
partials)
  install
  python3 benchmarks/kernel_sweep.py --partials 2>&1 | grep -v OutOfResources | tee "$OUT/sweep_partials.log"
  ;;
fair)  # is the full-attention step slowed by PDL on its split-KV kernel? (n = 131072, batch 1)
  python3 -c "import nectar_kernels" 2>/dev/null || install
  for cfg in default NECTAR_PDL_DOC=0 NECTAR_PDL=0; do
    env $( [ $cfg = default ] || echo $cfg ) nectar profile --shape smollm2-135m --device cuda --n 1024,131072 --batch 1 --steps 200 \
      --json "$OUT/fair_smol_$cfg.json" 2>&1 | tail -6 | tee -a "$OUT/fair.log"
    env $( [ $cfg = default ] || echo $cfg ) nectar profile --shape llama3-8b --device cuda --n 131072 --batch 1 --steps 100 \
      --json "$OUT/fair_l8b_$cfg.json" 2>&1 | tail -4 | tee -a "$OUT/fair.log"
  done
  ;;
smol)
  python3 -c "import nectar_kernels" || install
  mkdir -p "$OUT/res"
  nectar profile --shape smollm2-135m --device cuda --n 1024,2048,4096,8192,16384,32768,65536,131072 --batch 1,16 \
    --json "$OUT/res/smol.json" 2>&1 | tee "$OUT/profile.log"
  ;;
setup)  # after kern, in the same call (carry .carry/a and .whl)
  mkdir -p /root/parts && cp .carry/a/smol.part00 /root/parts/ && rm -rf /root/manuals && cp -r .carry/a/manuals /root/manuals
  install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  ;;
real)  # second half of the GGUF: GPU fit timing and real-artifact parity (CLI on the CUDA-graph step)
  smol_model || exit 1
  python3 -c "import nectar_kernels" || install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  timed_fit /root/grep.nectar "$OUT/fit.log"
  cp /root/grep.nectar/manifest.json "$OUT/fit_manifest.json"
  real_artifact_tests
  python3 benchmarks/probe_gen.py --batches 2 2>&1 | grep -v Warn | tee "$OUT/probe_gen.log"
  ;;
refit)  # after setup (carry .carry/b): the GPU fit timing alone, plus the fp32 full-attention kernel tests
  smol_model || exit 1
  timed_fit /root/grep.nectar "$OUT/fit.log"
  cp /root/grep.nectar/manifest.json "$OUT/fit_manifest.json"
  python3 -m pytest -q -p no:timeout tests/kernels/test_triton.py -k "cublas or full_attention" 2>&1 | tail -5 | tee "$OUT/tests.log"
  ;;
fitgpu)  # after setup (carry .carry/b): `nectar fit` on an empty Triton cache (and page cache), then warm; the
         # in-process breakdown (graphed vs eager fit heads; FIT_BREAKDOWN=0 skips it, FIT_EXTRAS=1 adds batch timings);
         # the CUDA fit tests. Round 1 ran it without the page-cache drop (a fresh machine: nothing cached yet).
  smol_model || exit 1
  python3 -c "import nectar_kernels" 2>/dev/null || install
  sync; echo 3 > /proc/sys/vm/drop_caches || echo "page cache not dropped"
  rm -rf "${TRITON_CACHE_DIR:-$HOME/.triton/cache}"  # cold: what the first fit on a fresh machine compiles
  for run in cold warm; do
    timed_fit /root/grep_$run.nectar "$OUT/fit_$run.log"
    cp /root/grep_$run.nectar/manifest.json "$OUT/fit_manifest_$run.json"
  done
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/fit_cold.log"
  [ "${FIT_BREAKDOWN:-1}" = 0 ] || python3 benchmarks/fit_time.py --breakdown "$OUT/breakdown.json" --model /root/smol.gguf \
    --device cuda --doc /root/manuals/grep.txt ${FIT_EXTRAS:+--extras} 2>&1 | grep -v Warn | tee "$OUT/breakdown.log"
  python3 -m pytest -q -p no:timeout -p no:cacheprovider tests/export/test_fit.py -k "cuda or device_loop or adam" 2>&1 \
    | tail -15 | tee "$OUT/tests.log"
  ;;
coldfit)  # after setup (carry .carry/b): $COLD (default 2) fits, each on an emptied Triton cache and page cache, and
          # the Triton cache's inventory after the first (which kernels a fit compiles, how many variants); WARM=1
          # adds a fit on the warm cache
  smol_model || exit 1
  python3 -c "import nectar_kernels" 2>/dev/null || install
  cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
  for i in $(seq ${COLD:-2}); do
    sync; echo 3 > /proc/sys/vm/drop_caches || echo "page cache not dropped"
    rm -rf "$cache"
    timed_fit /root/grep_cold$i.nectar "$OUT/fit_cold$i.log"
    if [ "$i" = 1 ]; then
      find "$cache" -name "*.json" ! -name "__grp__*" -exec python3 -c "import json,sys; [print(json.load(open(f)).get('name','?')) for f in sys.argv[1:]]" {} + \
        | sort | uniq -c | sort -rn | tee "$OUT/triton_inventory.txt"
    fi
  done
  [ "${WARM:-0}" = 1 ] && timed_fit /root/grep_warm.nectar "$OUT/fit_warm.log"
  grep -h "fit wall\|time per stage\|load model" "$OUT"/fit_*.log
  ;;
pdldoc)  # the profiles with PDL on the split-KV kernel forced on (res_pdl1) and off (res_pdl0): sets PDL_DOC_MAX_N
  python3 -c "import nectar_kernels" 2>/dev/null || install
  for v in 1 0; do
    mkdir -p "$OUT/res_pdl$v"
    for shape in smollm2-135m llama3-8b; do
      NECTAR_PDL_DOC=$v nectar profile --shape $shape --device cuda --n 1024,2048,4096,8192,16384,32768,65536,131072 --batch 1,16 \
        --json "$OUT/res_pdl$v/$shape.json" 2>&1 | tail -34 | tee -a "$OUT/pdldoc.log"
    done
  done
  ;;
profiles)  # the published profiles: both shapes, n 1K..128K, batch 1 and 16, + breakdowns
  python3 -c "import nectar_kernels" || install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  mkdir -p "$OUT/res"
  nectar profile --shape smollm2-135m --device cuda --n 1024,2048,4096,8192,16384,32768,65536,131072 --batch 1,16 \
    --json "$OUT/res/smol.json" --plot "$OUT/res/smol.png" 2>&1 | tee "$OUT/profile.log"
  nectar profile --shape llama3-8b --device cuda --n 1024,2048,4096,8192,16384,32768,65536,131072 --batch 1,16 \
    --json "$OUT/res/l8b.json" --plot "$OUT/res/l8b.png" 2>&1 | tee -a "$OUT/profile.log"
  for n in 1024 131072; do
    python3 benchmarks/step_breakdown.py --shape smollm2-135m --n $n --batch 1 2>&1 | grep -v Warn | tee -a "$OUT/breakdown.log"
  done
  python3 benchmarks/step_breakdown.py --shape llama3-8b --n 131072 --batch 1 2>&1 | grep -v Warn | tee -a "$OUT/breakdown.log"
  ;;
fitdefault)  # after setup (carry .carry/b, with doc_7000.txt): default `nectar fit` of grep.txt and of the first 7,000
            # tokens of the manuals on CUDA; the artifacts come back as one tar in ≤ 15 MiB pieces
            # (cat $OUT/arts.tar.* | tar x), for benchmarks/default_heads_cpu.py on a CPU
  smol_model || exit 1
  python3 -c "import nectar_kernels" 2>/dev/null || install
  mkdir -p /root/arts
  for doc in /root/manuals/grep.txt .carry/b/doc_7000.txt; do
    name=$(basename "$doc" .txt)
    nectar fit "$doc" --model /root/smol.gguf --device cuda --out /root/arts/$name.nectar 2>&1 | tr '\r' '\n' \
      | grep -E -v '^[^|]*: +[0-9]{1,2}%\|' | tee -a "$OUT/fit.log"
  done
  (cd /root && tar cf - arts) | split -b 15M - "$OUT/arts.tar."
  ;;
quality)  # after setup (carry .carry/b on the first call): with FIT=1 the fresh-machine `nectar fit` timing and the
          # real-artifact parity tests (CLI on the CUDA-graph step); then benchmarks/nectar_quality.py on the manuals
          # in $MANUALS with the settings in $QARGS (records in $OUT/q; semantic similarity later, on the CPU)
  smol_model || exit 1
  python3 -c "import nectar_kernels" 2>/dev/null || install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  if [ "${FIT:-0}" = 1 ]; then
    timed_fit /root/grep.nectar "$OUT/fit.log"
    real_artifact_tests
  fi
  quality_run /root/smol.gguf
  ;;
cli)  # after setup (carry .carry/b with smol.source.json): the CLI and runtime tests where the CLI's --device auto
     # takes the GPU (fits, ask, generate on CUDA), with the joined GGUF registered as the cached SmolLM2
  smol_model || exit 1
  python3 -c "import nectar_kernels" 2>/dev/null || install
  export NECTAR_HOME=/root/nectar_home; d=$NECTAR_HOME/models/smollm2-135m-instruct; mkdir -p "$d"
  ln -sf /root/smol.gguf "$d/SmolLM2-135M-Instruct.Q4_1.gguf"; cp .carry/b/smol.source.json "$d/source.json"
  python3 -m pytest -q -p no:timeout tests/runtime tests/export/test_cli_fit.py ${CLI_TESTS:-} 2>&1 | tail -25 | tee "$OUT/cli_tests.log"
  ;;
noise)  # after setup (carry .carry/b): the exact-match noise floor (benchmarks/noise_floor.py: the document cache
        # rounded to fp16 / bf16 / int8) on every manual, then, if $MANUALS is set, benchmarks/nectar_quality.py there
        # with $QARGS (e.g. budgets past the 25% target: how exact match grows with the artifact)
  smol_model || exit 1
  python3 -c "import nectar_kernels" 2>/dev/null || install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 benchmarks/noise_floor.py --manuals /root/manuals --model /root/smol.gguf --device cuda --no-semantic \
    --no-docs --quiet --json "$OUT/noise_floor.json" 2>&1 | grep -v Warn | tee "$OUT/noise.log"
  [ -n "${MANUALS:-}" ] && quality_run /root/smol.gguf
  ;;
gpart)  # Gemma 3 270M's GGUF (253 MB) in four back-to-back calls, carrying .carry/g0 (part 0, manuals) and .whl,
        # then .carry/g1, .carry/g2, .carry/g3 (`split -n 4 -d -a 1 FILE gemma.part` makes the parts)
  mkdir -p /root/gparts && cp .carry/g*/gemma.part* /root/gparts/ || exit 1
  if [ -d .carry/g0/manuals ]; then rm -rf /root/manuals && cp -r .carry/g0/manuals /root/manuals; fi
  python3 -c "import nectar_kernels" 2>/dev/null || install
  ls -la /root/gparts
  ;;
gemma)  # after the four gpart calls: benchmarks/nectar_quality.py on Gemma 3 270M for $MANUALS (records in $OUT/q)
  join_model /root/gemma.gguf /root/gparts/gemma.part{0,1,2,3} || exit 1
  quality_run /root/gemma.gguf
  ;;
esac
