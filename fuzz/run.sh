#!/usr/bin/env bash
# Runs every fuzz target for a bounded time each and prints, per target, the executions, the corpus
# size and whether it found a crash (README "Fuzzing"). Not part of CI: it takes SECONDS per target.
#
#   fuzz/run.sh [SECONDS] [TARGET...]   default 60 s, every target
#   fuzz/run.sh --build                 only builds the targets (a check that they still compile)
#
# Needs nightly Rust and cargo-fuzz (`cargo install cargo-fuzz`). The corpus grows in fuzz/corpus/
# from the committed seeds in fuzz/seeds/, with the dictionaries in fuzz/dicts/; crashes land in fuzz/artifacts/<target>/, each run's log in
# fuzz/logs/. FUZZ_SANITIZER=address builds with ASan (default none: the parsers are safe Rust, and
# without it the targets build faster and run several times as many inputs); FUZZ_JOBS sets the
# parallel build jobs.
set -uo pipefail
cd "$(dirname "$0")"
sanitizer=${FUZZ_SANITIZER:-none}
build=(cargo +nightly fuzz build --sanitizer "$sanitizer")
[ -n "${FUZZ_JOBS:-}" ] && build+=(--jobs "$FUZZ_JOBS")
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: cargo-fuzz is missing: cargo install cargo-fuzz (and rustup toolchain install nightly)" >&2
  exit 2
fi
if [ "${1:-}" = "--build" ]; then
  exec "${build[@]}"
fi
secs=${1:-60}
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
  echo "fuzz/run.sh: SECONDS must be a positive number, not \`$secs\`" >&2
  exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
"${build[@]}" || exit 1
mkdir -p logs
found=0
printf '%-15s %12s %8s  %s\n' target executions corpus crash
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  opts=(-max_total_time="$secs" -timeout=10 -print_final_stats=1)
  [ -f "dicts/$t.dict" ] && opts+=(-dict="dicts/$t.dict")
  before=$(ls "artifacts/$t")
  cargo +nightly fuzz run --sanitizer "$sanitizer" "$t" "${dirs[@]}" -- "${opts[@]}" \
    >"logs/$t.log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -n 1)
  corpus=$(find "corpus/$t" -type f | wc -l)
  crash=no
  new=$(comm -13 <(echo "$before") <(ls "artifacts/$t") | head -n 1)
  if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
    found=1
    crash="YES (exit $rc): ${new:+fuzz/artifacts/$t/$new, }log fuzz/logs/$t.log"
  fi
  printf '%-15s %12s %8s  %s\n' "$t" "${execs:-?}" "$corpus" "$crash"
done
exit "$found"
