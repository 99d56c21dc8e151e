#!/usr/bin/env bash
# Submit one Snakemake job; Snakemake calls:  submit.sh RULE THREADS GPUS MEM_MB RUNTIME_MIN JOBSCRIPT
# and reads the job id from stdout. Replace the `local` branch with your scheduler's submit command, e.g.
#   PBS: qsub -N "$rule" -l "select=1:ncpus=$threads:ngpus=$gpus:mem=${mem_mb}mb,walltime=$((runtime/60)):$((runtime%60)):00" "$jobscript"
#   LSF: bsub -J "$rule" -n "$threads" -gpu "num=$gpus" -M "${mem_mb}MB" -W "$runtime" "$jobscript" | grep -o '[0-9]\+' | head -1
# As shipped (SUBMIT=local, the default) it runs the job on this machine in the background, in its own process
# group, recording its exit code for status.sh: a way to try the profile without a cluster.
set -euo pipefail
rule=$1 threads=$2 gpus=$3 mem_mb=$4 runtime=$5 jobscript=$6
case "${SUBMIT:-local}" in
  local)
    jobs=.snakemake/cluster-jobs
    mkdir -p "$jobs"
    id="local-$rule-$(date +%s%N)"
    setsid nohup bash -c 'bash "$1"; echo $? > "$2.rc.tmp" && mv "$2.rc.tmp" "$2.rc"' _ "$jobscript" "$jobs/$id" \
      > "$jobs/$id.log" 2>&1 < /dev/null &
    echo "$!" > "$jobs/$id.pid"
    echo "$id" ;;
  *) echo "submit.sh: unknown SUBMIT=$SUBMIT (edit this script for your scheduler)" >&2; exit 1 ;;
esac
