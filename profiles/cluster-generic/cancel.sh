#!/usr/bin/env bash
# Cancel the given job ids (Snakemake calls it on Ctrl-C). Replace the `local` branch for your scheduler
# (scancel "$@", qdel "$@", bkill "$@").
set -uo pipefail
case "${SUBMIT:-local}" in
  local)
    for id in "$@"; do
      pid_file=.snakemake/cluster-jobs/$id.pid
      [[ -f "$pid_file" ]] && kill -TERM -- "-$(cat "$pid_file")" 2>/dev/null
    done
    exit 0 ;;
  *) echo "cancel.sh: unknown SUBMIT=$SUBMIT (edit this script for your scheduler)" >&2; exit 1 ;;
esac
