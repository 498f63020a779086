#!/usr/bin/env bash
# The action's command (action.yml): runs `mesh rollout <command>` on one Canary, follows the
# rollout with `mesh rollout status --watch --output github` (progress lines, annotations and the
# gate table in the step summary), then reads `mesh rollout status --output json` once for the
# step's outputs. The step's exit status is that of `mesh rollout status`:
#   0 promoted, 1 rolled back, 2 timed out, 3 waiting for promotion, 4 mesh could not answer
# (3 becomes 0 with allow-waiting: "true"; pause exits 0 once the rollout is frozen).
#
# Environment (set by action.yml from its inputs): MESH (the CLI), INPUT_COMMAND, INPUT_CANARY,
# INPUT_NAMESPACE, INPUT_TIMEOUT, INPUT_ALLOW_WAITING, INPUT_BY, INPUT_SERVER, INPUT_KUBECONFIG,
# INPUT_CONTEXT, INPUT_KUBE. Needs jq (installed on GitHub-hosted runners).
set -uo pipefail

mesh="${MESH:-mesh}"
command="${INPUT_COMMAND:-status}"
name="${INPUT_CANARY:-}"
timeout="${INPUT_TIMEOUT:-15m}"

# Exit codes of `mesh rollout status` (cli/src/rollout.rs) and the result each one means; a
# test checks this table against the CLI.
result_of() {
  case "$1" in
    0) echo promoted ;;
    1) echo rolled-back ;;
    2) echo timed-out ;;
    3) echo waiting-promotion ;;
    *) echo error ;;
  esac
}

fail() {
  echo "::error title=mesh rollout ${command} ${name}::$*"
  echo "mesh action: $*" >&2
  output result error
  output exit-code 4
  exit 4
}

output() {
  if [[ -n "${GITHUB_OUTPUT:-}" ]]; then echo "$1=$2" >>"$GITHUB_OUTPUT"; fi
  echo "  $1: $2"
}

case "$command" in
  status | promote | abort | pause | resume) ;;
  *) fail "unknown command \"$command\"; use status, promote, abort, pause, resume or install" ;;
esac
[[ -n "$name" ]] || fail "the canary input is empty; name the Canary to $command"
command -v jq >/dev/null || fail "jq is needed to read mesh's JSON report (apt-get install jq, brew install jq)"

where=(-n "${INPUT_NAMESPACE:-default}")
if [[ -n "${INPUT_KUBECONFIG:-}" ]]; then where+=(--kubeconfig "$INPUT_KUBECONFIG"); fi
if [[ -n "${INPUT_CONTEXT:-}" ]]; then where+=(--context "$INPUT_CONTEXT"); fi
if [[ "${INPUT_KUBE:-false}" == true ]]; then where+=(--kube); fi
if [[ ${#where[@]} -eq 2 && -n "${INPUT_SERVER:-}" ]]; then where+=(--server "$INPUT_SERVER"); fi

by="${INPUT_BY:-}"
if [[ -z "$by" && -n "${GITHUB_REPOSITORY:-}" && -n "${GITHUB_RUN_ID:-}" ]]; then
  by="${GITHUB_SERVER_URL:-https://github.com}/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID"
fi

# One JSON report; `mesh rollout status` exits non-zero for anything but a promoted rollout, so
# only its output counts here.
report() {
  local json
  json="$("$mesh" rollout status "$name" "${where[@]}" -o json)"
  jq -e . >/dev/null 2>&1 <<<"$json" || return 1
  echo "$json"
}

# What a request waits behind: the gate it opens (or the phase it ends) must be left before
# `status --watch` is asked again, or the watch would see the old wait and return at once.
waiting_key() { jq -r 'if .exitCode == 3 then "waiting \(.gate.id // "")" else "moved" end' <<<"$1"; }

watch=true
case "$command" in
  promote | abort | resume)
    before="$(report)" || fail "cannot read canary $name before the $command (see the error above)"
    args=()
    if [[ "$command" != resume && -n "$by" ]]; then args=(--by "$by"); fi
    "$mesh" rollout "$command" "$name" "${where[@]}" ${args[@]+"${args[@]}"} || fail "mesh rollout $command $name failed (see the error above)"
    key="$(waiting_key "$before")"
    if [[ "$key" == waiting* ]]; then
      deadline=$((SECONDS + 120))
      while now="$(report)" && [[ "$(waiting_key "$now")" == "$key" ]]; do
        ((SECONDS < deadline)) || fail "canary $name still waits at the same gate 2 minutes after the $command; is the rollout controller running?"
        sleep 1
      done
    fi
    ;;
  pause)
    "$mesh" rollout pause "$name" "${where[@]}" || fail "mesh rollout pause $name failed (see the error above)"
    watch=false
    ;;
esac

code=0
if [[ "$watch" == true ]]; then
  "$mesh" rollout status "$name" "${where[@]}" --watch --timeout "$timeout" -o github
  code=$?
fi
json="$(report)" || fail "cannot read canary $name's status (see the error above)"

result="$(result_of "$code")"
if [[ "$command" == pause ]]; then result=paused; fi
decision=""
if [[ "$result" =~ ^(promoted|rolled-back|waiting-promotion)$ ]]; then
  # From the start of this rollout's analysis (its last Progressing event) to its last event.
  decision="$(jq -r '
    def t: sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601;
    (.history // []) as $h
    | ([$h | to_entries[] | select(.value.reason == "Progressing") | .key] | last) as $i
    | if $i == null then "" else (($h | last | .time | t) - ($h[$i].time | t) | floor | tostring) end
  ' <<<"$json")"
fi

echo "outputs:"
output phase "$(jq -r '.phase' <<<"$json")"
output canary-weight "$(jq -r '.canaryWeight' <<<"$json")"
output result "$result"
output decision-seconds "$decision"
output failed-checks "$(jq -r '.failedChecks' <<<"$json")"
output failed-gates "$(jq -r '[.gates[]? | select(.verdict == "Fail") | .name] | join(",")' <<<"$json")"
output exit-code "$code"

# One error annotation per gate that failed, naming it with its numbers.
if [[ "$code" != 0 ]]; then
  jq -r --arg canary "$name" '
    def esc: tostring | gsub("%"; "%25") | gsub("\r"; "%0D") | gsub("\n"; "%0A");
    def esc_prop: esc | gsub(":"; "%3A") | gsub(","; "%2C");
    def num: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
    .gates[]? | select(.verdict == "Fail")
    | "::error title=\("Canary \($canary) gate \(.name) failed" | esc_prop)::\("gate \(.name): canary \(.canary | num) vs primary \(.primary | num) (\(.canarySamples)/\(.primarySamples) requests), \(.test): \(.message)" | esc)"
  ' <<<"$json"
fi

if [[ -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
  {
    echo
    echo "**mesh rollout $command $name**: result \`$result\`${decision:+ after ${decision}s}, exit code $code."
  } >>"$GITHUB_STEP_SUMMARY"
fi

if [[ "$code" == 3 && "${INPUT_ALLOW_WAITING:-false}" == true ]]; then
  echo "canary $name waits for promotion; allow-waiting is set, so this step succeeds"
  exit 0
fi
exit "$code"
