#!/usr/bin/env bash
# Queues a ckptconv conversion on Slurm as N parallel parts, then a finishing step that runs only if all succeed:
#   scripts/slurm/submit.sh IN OUT N [convert flags, e.g. --dtype bf16 --max-shard-size 5GB]
# Every node must see IN and OUT at the same paths (a shared filesystem) and the same ckptconv (env CKPTCONV,
# default: the one on PATH here). The jobs get IN, OUT, N and CKPTCONV through the environment (sbatch's default
# --export=ALL). The plan is made here first, so a bad flag or input fails now rather than in the queue.
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 IN OUT N [convert flags]" >&2; exit 2; fi
here=$(cd "$(dirname "$0")" && pwd)
IN=$(realpath "$1"); OUT=$(realpath -m "$2"); N=$3; shift 3
CKPTCONV=$(command -v "${CKPTCONV:-ckptconv}") || { echo "$0: no ckptconv on PATH (set CKPTCONV)" >&2; exit 1; }
CKPTCONV=$(realpath "$CKPTCONV")
export IN OUT N CKPTCONV
"$CKPTCONV" convert "$IN" "$OUT" "$@" --plan-parts "$N" >/dev/null
parts=$(sbatch --parsable --array="1-$N" "$here/ckptconv-part.sbatch" "$@")
finish=$(sbatch --parsable --dependency="afterok:${parts%%;*}" "$here/ckptconv-finish.sbatch" "$@")
echo "parts: job $parts (array 1-$N); finish: job $finish"
