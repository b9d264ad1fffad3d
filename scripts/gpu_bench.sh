#!/usr/bin/env bash
# The GPU table of issue 10: `bench.py --device cuda` on one GPU, its JSON in results/bench_cuda.json.
#
#   scripts/gpu_bench.sh --fetch-wheels   here, once: the wheels the device machine lacks, into .whl/
#   scripts/gpu_bench.sh                  on the GPU machine: install .whl/ if present, run, copy
#   SCALE_SECONDS=0 OUT=/tmp/b PYTHON=.venv/bin/python scripts/gpu_bench.sh --device cpu --quick --grid --loop --loop-batches 8 16 --loop-faces 128 --loop-profile 2 --steps 2 --repeats 1
#                                         a dry run on the CPU, every phase of the GPU run (1-2 min; arguments
#                                         go on to bench.py; only a CUDA run is copied into results/; the
#                                         GPU image's torch 2.11 and torchvision 0.26 ran it too, 2026-12-07)
#   scripts/gpu_bench.sh --scale          on the same machine, a second call (the first leaves the scale test out):
#                                         issue 11 on the GPU, scripts/imdb_scale.py (460,723 rows, 3,000
#                                         photos): one process, then profiled under cProfile, then 4
#                                         processes sharing the GPU under torchrun, then one with
#                                         --no-host-pyramids, then with --prepare-in processes (~5 min; one
#                                         log for all); a dry run here:
#                                         DEVICE=cpu OUT=/tmp/s PYTHON=.venv/bin/python scripts/gpu_bench.sh --scale --rows 3000 --photos 40
#   scripts/gpu_bench.sh --shards         on the same machine, a second call: pre_process.py sharded
#                                         (issue 11): 1 CPU process against torchrun's 2, 4 threads
#                                         each, on 400 IMDB-sized photos (~1.5 min)
#
# On the device machine (torch 2.11 / torchvision 0.26, no tensorboardX, mtcnn or lz4): `run` with
# carry [".whl"], timeout_s 600 and the command `AGE_GENDER_COMMIT=<git rev-parse HEAD here> bash
# scripts/gpu_bench.sh` (the copy's .git, if any, is not this checkout's: utils.git_commit gives
# AGE_GENDER_COMMIT to the JSON and to every train.py run's config.json); the JSON and the logs come back from $OUT (files_at); copy bench_cuda.json
# into results/, commit it and put its table in the README's Speed section with the date, GPU,
# torch version and commit. On a GPU box of your own with our requirements installed:
# PYTHON=.venv/bin/python scripts/gpu_bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # the versions our venv holds; the device's python is 3.12, so cp312 builds; their own needs
    # (joblib, numpy, packaging, protobuf) are on the device already
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl tensorboardX==2.6.5 mtcnn==1.0.0 lz4==4.4.5
    # .whl/ travels only as a carried, git-ignored path
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    ls -l .whl
    exit 0
fi

PYTHON=${PYTHON:-python3}
missing=$("$PYTHON" -c 'import importlib.util as u; print(*(m for m in ("tensorboardX", "mtcnn", "lz4") if not u.find_spec(m)))')
if [[ -n "$missing" ]]; then  # the device machine lacks these
    if ! compgen -G ".whl/*.whl" >/dev/null; then  # fail at once: a lease is too short to find out later
        echo "error: $PYTHON lacks $missing and .whl/ holds no wheels: run scripts/gpu_bench.sh --fetch-wheels" \
             "here first, and carry .whl" >&2
        exit 3
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-results}
mkdir -p "$out"
if [[ "${1:-}" == "--scale" ]]; then  # 16 cores: 8 decode workers for one process; 4 processes of 3
    set +e
    timeout --kill-after=10 "${SCALE_SECONDS:-300}" "$PYTHON" scripts/imdb_scale.py --device "${DEVICE:-cuda}" \
        --work /tmp/imdb_scale "${@:2}" --out-json "$out/imdb_scale_cuda.json" --profile "$out/imdb_scale_cuda_profile.txt" -- --workers 8 \
        2>&1 | tee "$out/imdb_scale_cuda.log"
    # second, as the lease may end before the A/B below: 4 processes sharing the GPU, the way to issue 11's 600
    # photos/s if one process's host work bounds it (187 photos/s at 7a9f17a, MTCNN's glue on the host)
    OMP_NUM_THREADS=2 timeout --kill-after=10 "${SCALE_SECONDS:-300}" "$PYTHON" scripts/imdb_scale.py --device "${DEVICE:-cuda}" \
        --nproc 4 --work /tmp/imdb_scale "${@:2}" --out-json "$out/imdb_scale_cuda_4.json" -- --workers 3 \
        2>&1 | tee -a "$out/imdb_scale_cuda.log"
    # scripts/gil_cost.py: the shrinking threads slow the feeding thread's ops through the GIL. Which pays on a GPU:
    # the pyramids made on the device by the feeding thread, or shrinking and pyramids in the decoding processes
    timeout --kill-after=10 "${SCALE_SECONDS:-300}" "$PYTHON" scripts/imdb_scale.py --device "${DEVICE:-cuda}" \
        --work /tmp/imdb_scale "${@:2}" --out-json "$out/imdb_scale_cuda_nohp.json" -- --workers 8 --no-host-pyramids \
        2>&1 | tee -a "$out/imdb_scale_cuda.log"
    timeout --kill-after=10 "${SCALE_SECONDS:-300}" "$PYTHON" scripts/imdb_scale.py --device "${DEVICE:-cuda}" \
        --work /tmp/imdb_scale "${@:2}" --out-json "$out/imdb_scale_cuda_procs.json" -- --workers 8 --prepare-in processes \
        2>&1 | tee -a "$out/imdb_scale_cuda.log"
    exit 0
fi
if [[ "${1:-}" == "--shards" ]]; then  # the device machine's 16 cores: room for two processes of 4 threads
    for n in 1 2; do
        OMP_NUM_THREADS=4 timeout --kill-after=10 150 "$PYTHON" scripts/imdb_scale.py --rows 30000 --photos 400 \
            --device cpu --nproc "$n" --work /tmp/imdb_shards --out-json "$out/shards_$n.json" -- --workers 2 \
            2>&1 | tee "$out/shards_$n.log"
    done
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# the GPU-only tests first (train.py --cuda-graph against the eager step): a failure is reported, timing goes on
if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    timeout --kill-after=10 "${TEST_SECONDS:-150}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
        | tee "$out/test_cuda.log" || echo "tests/test_cuda.py failed: see $out/test_cuda.log" >&2
fi

# Time: bench.py took 294 s on an H200 at 7a9f17a with three loop rows (eager at 256, 1024, 2048), of
# which the folder (41 s) and inference (71 s) phases, measured there, are left out now: the issues'
# table does not hold them. The four loop rows here (eager and cuda-graph at 256 and 1024) should take
# ~130 s, their two profiled runs ~40 s, and the grid's fifth cell, ResNet-50 at 224 compiled (issue 10's
# 5,000 images/s is judged on its faster mode), ~90 s of compiling: ~6 minutes, then the IMDB scale test
# (scripts/imdb_scale.py, 150 s), after the tests (~1-2 min): near 10 minutes in all, so the scale test runs only
# with SCALE_SECONDS set (say 150): by default this call stays under the 600 s a call may take, and returns at most
# the 8 files the device tool brings back (7 without the scale test), and --scale is the second call.
# Each is cut by `timeout`; bench.py stops its phase in flight on SIGTERM and still writes its JSON,
# so a run cut short keeps every phase it finished. --steps 50 (not 20): a ResNet-18 step at batch
# 256 takes ~15 ms, so 20 steps are 0.3 s, too short to time against launch jitter; 50 steps of the
# slowest grid cell (ResNet-50 at 224, ~60 ms a step) still take only 3 s. --repeats 2: each pair of
# modes runs in both orders, as on the CPU. Loop batches 256 (the default) and 1024, each eager and captured.
# --loop-profile 10: at batch 256, where the loop lost most against the bare step (0.73), one short train.py
# --profile run per mode (21 steps, ~20 s each, estimated): where a step's time goes, per thread, and the GPU's
# busy share; bench_cuda_profile_{eager,cuda-graph}_b256.txt and .json.gz (a Perfetto trace) come back beside the JSON.
export PYTHONUNBUFFERED=1
set +e
timeout --kill-after=10 "${BENCH_SECONDS:-420}" "$PYTHON" bench.py --device cuda --steps 50 --repeats 2 \
    --loop-batches 256 1024 --loop-modes eager cuda-graph --loop-profile 10 --no-folder --no-infer \
    --grid-add resnet50:224:compile \
    "$@" --out "$out/bench_cuda.json" 2>&1 | tee "$out/bench_cuda.log"
rc=${PIPESTATUS[0]}
if [[ -f scripts/imdb_scale.py && "${SCALE_SECONDS:-0}" -gt 0 ]]; then
    # 460,723 rows, 3,000 IMDB-sized photos; 8 decode/write workers for the 16 cores of the device machine
    timeout --kill-after=10 "$SCALE_SECONDS" "$PYTHON" scripts/imdb_scale.py --device cuda \
        --work /tmp/imdb_scale --out-json "$out/imdb_scale_cuda.json" -- --workers 8 2>&1 | tee "$out/imdb_scale_cuda.log"
    scale_rc=${PIPESTATUS[0]}
    cp /tmp/imdb_scale/run.log "$out/imdb_scale_run.log" 2>/dev/null || true
    [[ $scale_rc -eq 0 ]] || echo "imdb_scale.py failed (exit $scale_rc; 124: past its time): see $out/imdb_scale_cuda.log" >&2
fi
set -e
if [[ $rc -ne 0 ]]; then  # 2: a phase did not finish (its JSON holds the others); 124: past the time
    echo "bench.py exit $rc: see $out/bench_cuda.log" >&2
fi
on_cuda='import json, sys; sys.exit(not json.load(open(sys.argv[1]))["device"].startswith("cuda"))'
if [[ -f "$out/bench_cuda.json" ]] && "$PYTHON" -c "$on_cuda" "$out/bench_cuda.json"; then
    mkdir -p results
    [[ "$out" -ef results ]] || cp "$out/bench_cuda.json" results/bench_cuda.json
    echo "wrote results/bench_cuda.json"
fi
exit "$rc"
