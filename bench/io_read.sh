#!/usr/bin/env bash
# Cold read throughput of the core's engine against raw references on the same file.
#
#   bash bench/io_read.sh [OUT_DIR]        (default bench/out, git-ignored)
#
# Creates (once) a 4 GiB store of 16 units of 256 MiB in OUT_DIR, then reads every unit:
#   - through the Engine with the O_DIRECT pread backend, 1, 4 and 8 threads, page cache
#     dropped first, into two reused page-aligned buffers, checksums verified;
#   - through the Engine with the mmap backend, cold, 4 threads;
# and measures the raw references on the same file:
#   - dd if=FILE of=/dev/null bs=16M iflag=direct
#   - fio, 8 jobs of 8 MiB O_DIRECT psync reads over 8 slices of the file
#   - fio, 1 job, libaio, iodepth 32, 8 MiB O_DIRECT reads
# and prints one markdown table of medians. GB/s are 10^9 bytes per second.
#
# Environment: UNITS (16), UNIT_MIB (256), THREADS ("1 4 8"), CHUNK_MIB (8), REPS (3),
# EXTRA_ARGS (passed to every engine read, e.g. "--no-verify").
set -euo pipefail

OUT=$(realpath -m "${1:-$(dirname "$0")/out}")
cd "$(dirname "$0")/.."
UNITS=${UNITS:-16}
UNIT_MIB=${UNIT_MIB:-256}
THREADS=${THREADS:-"1 4 8"}
CHUNK_MIB=${CHUNK_MIB:-8}
REPS=${REPS:-3}
EXTRA_ARGS=${EXTRA_ARGS:-}
mkdir -p "$OUT"
STORE="$OUT/read-bench-${UNITS}x${UNIT_MIB}MiB.tstore"

cargo build --release -q -p tensorstream-core --example read_bench
BIN=target/release/examples/read_bench

if [ ! -f "$STORE" ]; then
    "$BIN" write "$STORE" --units "$UNITS" --unit-mib "$UNIT_MIB"
fi
SIZE=$(stat -c %s "$STORE")

gbps_of() { sed -n 's/.* gbps=\([0-9.]*\).*/\1/p'; }
engine_read() { # backend threads
    # shellcheck disable=SC2086
    "$BIN" read "$STORE" --backend "$1" --threads "$2" --chunk-mib "$CHUNK_MIB" --cold $EXTRA_ARGS |
        grep '^RESULT' | gbps_of
}
dd_read() {
    # "4294971392 bytes (4.3 GB, 4.0 GiB) copied, 2.61 s, 1.6 GB/s": recompute from bytes and seconds.
    dd if="$STORE" of=/dev/null bs=16M iflag=direct 2>&1 | tail -1 |
        awk '{ for (i = 1; i <= NF; i++) if ($i == "s,") s = $(i-1); printf "%.3f", $1 / s / 1e9 }'
}
fio_gbps() { python3 -c 'import json,sys; j=json.load(sys.stdin); print("%.3f" % (sum(x["read"]["bw_bytes"] for x in j["jobs"]) / 1e9))'; }
SLICE=$(( SIZE / 8 / (8 << 20) * (8 << 20) ))
fio_psync() {
    fio --name=seq --filename="$STORE" --direct=1 --bs=8M --rw=read --numjobs=8 \
        --size="$SLICE" --offset_increment="$SLICE" --group_reporting --readonly \
        --output-format=json | fio_gbps
}
fio_aio() {
    fio --name=aio --filename="$STORE" --direct=1 --bs=8M --rw=read --numjobs=1 \
        --ioengine=libaio --iodepth=32 --readonly --output-format=json | fio_gbps
}

if ! command -v fio >/dev/null 2>&1; then
    echo "fio missing; trying apt-get install -y fio" >&2
    (apt-get update -qq && apt-get install -y -qq fio) >/dev/null 2>&1 || true
fi

# Each entry: "label|threads|is_reference|command". The disk of a virtual machine drifts,
# so the methods run round-robin, REPS rounds, and the table shows each one's median.
METHODS=()
for t in $THREADS; do
    METHODS+=("engine, pread O_DIRECT (${CHUNK_MIB} MiB chunks)|$t|0|engine_read odirect $t")
done
METHODS+=("engine, mmap, cold (${CHUNK_MIB} MiB chunks)|4|0|engine_read mmap 4")
METHODS+=("dd bs=16M iflag=direct|1|1|dd_read")
if command -v fio >/dev/null 2>&1; then
    METHODS+=("fio psync, 8 jobs x 1/8 of the file, bs=8M, direct|8|1|fio_psync")
    METHODS+=("fio libaio iodepth=32, bs=8M, direct|1|1|fio_aio")
else
    echo "fio unavailable: only dd is a reference" >&2
fi
declare -A RUNS
for ((r = 1; r <= REPS; r++)); do
    echo "round $r of $REPS" >&2
    for i in "${!METHODS[@]}"; do
        IFS='|' read -r label threads _ cmd <<<"${METHODS[$i]}"
        v=$($cmd)
        echo "  $label, $threads threads: $v GB/s" >&2
        RUNS[$i]="${RUNS[$i]:-} $v"
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ROWS=()
REFS=()
for i in "${!METHODS[@]}"; do
    IFS='|' read -r label threads ref _ <<<"${METHODS[$i]}"
    m=$(echo "${RUNS[$i]}" | median)
    ROWS+=("$label|$threads|$m|$(echo "${RUNS[$i]}" | sed 's/^ //')")
    [ "$ref" = 1 ] && REFS+=("$m")
done

BEST=$(printf '%s\n' "${REFS[@]}" | sort -g | tail -1)
echo
echo "Cold sequential reads of a $(awk -v s="$SIZE" 'BEGIN { printf "%.2f", s / 1e9 }') GB store ($UNITS units of $UNIT_MIB MiB); $(nproc) cores; medians of $REPS interleaved rounds; best raw reference (median) $BEST GB/s"
echo
echo "| method | threads | GB/s (median) | % of best raw | runs |"
echo "| --- | ---: | ---: | ---: | --- |"
for row in "${ROWS[@]}"; do
    IFS='|' read -r m t g runs <<<"$row"
    pct=$(awk -v g="$g" -v b="$BEST" 'BEGIN { printf "%.0f", 100 * g / b }')
    echo "| $m | $t | $g | $pct% | $runs |"
done
