#!/usr/bin/env bash
# An OCI runtime for dockerd on hosts whose root lacks CAP_SYS_RESOURCE in its
# bounding set. There runc cannot grant that capability nor lower
# oom_score_adj, so every pod sandbox fails ("can't get final child's PID from
# pipe: EOF") and so does every privileged container ("unable to apply caps").
# This wrapper removes CAP_SYS_RESOURCE from the spec's capability sets
# (config.json of the bundle on create/run, the --process spec on exec) and
# raises a negative oomScoreAdj to 0, then runs the real runc unchanged.
# `cargo xtask e2e` registers it only where the capability is missing.
set -euo pipefail
RUNC="${ERGON_E2E_RUNC:-$(command -v runc)}"

# fix_spec FILE JQ_PATH: JQ_PATH is the object holding `capabilities` ("" for the root).
fix_spec() {
    local file="$1" at="$2" tmp
    [ -f "$file" ] || return 0
    tmp="$(mktemp "$file.XXXXXX")"
    jq "if $at.capabilities then
            $at.capabilities |= with_entries(.value |= (. // [] | map(select(. != \"CAP_SYS_RESOURCE\"))))
          else . end
        | if ($at.oomScoreAdj // 0) < 0 then $at.oomScoreAdj = 0 else . end" "$file" >"$tmp"
    mv "$tmp" "$file"
}

bundle="" process="" cmd=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    a="${args[$i]}"
    case "$a" in
    --bundle | -b) bundle="${args[$((i + 1))]}" ;;
    --bundle=*) bundle="${a#--bundle=}" ;;
    --process | -p) process="${args[$((i + 1))]}" ;;
    --process=*) process="${a#--process=}" ;;
    create | run | exec) [ -z "$cmd" ] && cmd="$a" ;;
    esac
done
case "$cmd" in
create | run) fix_spec "${bundle:-.}/config.json" ".process" ;;
exec) [ -n "$process" ] && fix_spec "$process" "" ;;
esac
exec "$RUNC" "$@"
