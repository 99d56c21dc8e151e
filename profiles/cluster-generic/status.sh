#!/usr/bin/env bash
# Print one of running | success | failed for a job id from submit.sh (Snakemake polls it). Replace the `local`
# branch for your scheduler, e.g.
#   SLURM-like: state=$(sacct -j "$1" -X -n -o State | head -1 | tr -d ' '); RUNNING/PENDING -> running,
#               COMPLETED -> success, anything else (FAILED, TIMEOUT, CANCELLED, OUT_OF_MEMORY, NODE_FAIL) -> failed
#   PBS:        qstat -xf "$1" | grep -q 'Exit_status = 0' -> success; job_state = [QRH] -> running; else failed
# A job that is gone without an exit code (killed by the scheduler) is `failed`, so Snakemake never waits on it.
set -uo pipefail
id=$1
case "${SUBMIT:-local}" in
  local)
    jobs=.snakemake/cluster-jobs
    if [[ -f "$jobs/$id.rc" ]]; then
      [[ "$(cat "$jobs/$id.rc")" == 0 ]] && echo success || echo failed
    elif [[ -f "$jobs/$id.pid" ]] && kill -0 "$(cat "$jobs/$id.pid")" 2>/dev/null; then
      echo running
    else
      echo failed
    fi ;;
  *) echo "status.sh: unknown SUBMIT=$SUBMIT (edit this script for your scheduler)" >&2; exit 1 ;;
esac
