#!/usr/bin/env bash
# Build the sdist and wheel, install the wheel with pipx into a throwaway PIPX_HOME (torch held to the
# CPU build by packaging/cpu-constraints.txt), then run `edgectx --version`, a one-shot chat, `edgectx heads info`,
# `edgectx ingest` of a small file followed by `chat --doc` restoring it, and `edgectx plan`, from it.
# Usage: bash packaging/smoke.sh        (run from any directory; needs python3 with venv)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip install -q build pipx
python3 -m build --sdist --wheel --outdir "$work/dist" "$root"
wheel=$(ls "$work"/dist/edgectx-*.whl)
ls "$work"/dist/edgectx-*.tar.gz >/dev/null

export PIPX_HOME="$work/pipx" PIPX_BIN_DIR="$work/bin" PIPX_MAN_DIR="$work/man"
export PIP_CONSTRAINT="$root/packaging/cpu-constraints.txt"
python3 -m pipx install "$wheel"

"$work/bin/edgectx" --version
doctor=$(EDGECTX_HOME="$work/home" "$work/bin/edgectx" doctor --json)
grep -A2 '"cpu attention"' <<<"$doctor" | grep -q '"ok": true' \
    || { echo "smoke: the installed edgectx did not build its CPU attention (kernels/cpu_attention.c)" >&2; exit 1; }
answer=$(cd "$work" && "$work/bin/edgectx" chat --prompt "What is the capital of France?" --temperature 0 --max-tokens 24)
echo "answer: $answer"
grep -q "Paris" <<<"$answer" || { echo "smoke: the installed edgectx did not answer 'Paris'" >&2; exit 1; }
heads=$(EDGECTX_HOME="$work/home" "$work/bin/edgectx" heads info)  # only what the wheel ships
echo "heads: $heads"
grep -q "retaining heads (width" <<<"$heads" || { echo "smoke: the wheel does not ship the embedded model's retaining heads" >&2; exit 1; }
for i in $(seq 20); do echo "Line $i of the smoke test's document: the launch code is 4711."; done > "$work/doc.txt"
EDGECTX_HOME="$work/home" "$work/bin/edgectx" ingest "$work/doc.txt" --json > "$work/ingest.json"
grep -q '"already_ingested": false' "$work/ingest.json" || { echo "smoke: edgectx ingest did not ingest a text file" >&2; exit 1; }
reopened=$(cd "$work" && EDGECTX_HOME="$work/home" "$work/bin/edgectx" chat --doc "$work/doc.txt" --prompt "What is the launch code?" \
           --temperature 0 --max-tokens 16 2>&1)
echo "chat --doc: $reopened"
grep -q "restored" <<<"$reopened" || { echo "smoke: chat --doc did not restore the ingested snapshot" >&2; exit 1; }
plan=$("$work/bin/edgectx" plan --synthetic llama-3.1-8b --context 131072 --gpu-mem-gib 24 --weights nf4 --host-mem-gib 64)
echo "$plan"
grep -q "of 24 GiB: fits" <<<"$plan" || { echo "smoke: edgectx plan did not plan Llama-3.1-8B at 128K in 24 GiB" >&2; exit 1; }
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
EDGECTX_HOME="$work/home" "$work/bin/edgectx" serve --port "$port" > "$work/serve.log" 2>&1 &
server=$!
for i in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
served=$(curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 24}' || true)
kill "$server"; wait "$server" || true
echo "serve: $served"
grep -q "Paris" <<<"$served" || { echo "smoke: edgectx serve did not answer 'Paris' over HTTP" >&2; cat "$work/serve.log" >&2; exit 1; }
answer=$(cd "$work" && "$work/bin/edgectx" chat --engine "http://127.0.0.1:1/v1" --prompt "hi" 2>&1 || true)
grep -q "cannot be reached" <<<"$answer" || { echo "smoke: chat --engine did not report an unreachable engine" >&2; exit 1; }
echo "smoke: OK (sdist, wheel, pipx install, version, one-shot chat, shipped retaining heads, ingest and chat --doc, plan, serve, --engine)"
