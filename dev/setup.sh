#!/usr/bin/env bash
# Idempotent environment setup: .venv + nanochat installed editable (maturin builds rustbpe).
# Used by speedrun.sh, run_continual.sh and .ci/run. A second run with nothing changed takes seconds.
#   NANOCHAT_EXTRAS   pip extras to install (default "dev,hf": pytest, hypothesis, openai client, playwright;
#                     transformers, peft, tokenizers for the Hugging Face export/import)
#   TORCH_SPEC        torch requirement (default: the pinned CPU build when no NVIDIA GPU, else "torch>=2.4")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
EXTRAS="${NANOCHAT_EXTRAS-dev,hf}"

# Generated code (HumanEval checks, tool calls) runs inside bubblewrap's namespaces; without bwrap it is
# refused unless --unsafe-exec is given. A system package, so it is checked even when .venv is current.
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing bubblewrap (the sandbox for generated code)"
    { apt-get install -y -qq bubblewrap || { apt-get update -qq && apt-get install -y -qq bubblewrap; }; } >/dev/null
  else
    echo "[setup] warning: bubblewrap (bwrap) is missing: generated code will not be run without --unsafe-exec." >&2
    echo "  install it as root: apt-get install bubblewrap (Fedora: dnf install bubblewrap)" >&2
  fi
fi

# Everything that changes what gets built/installed goes into the stamp.
stamp_now() {
  { cat pyproject.toml rustbpe/Cargo.toml rustbpe/src/*.rs; echo "$EXTRAS"; } | sha256sum | cut -d' ' -f1
}
if [ -f "$VENV/.nanochat_stamp" ] && [ "$(cat "$VENV/.nanochat_stamp")" = "$(stamp_now)" ] \
   && "$VENV/bin/python" -c "import rustbpe, nanochat, torch" 2>/dev/null; then
  echo "[setup] .venv is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -z "${TORCH_SPEC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH_SPEC="torch>=2.4"
    else TORCH_SPEC="torch==2.13.0"; fi   # on the offline dev/CI machines this resolves to a local CPU wheel
  fi
  echo "[setup] installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi

# Rust toolchain: needed to build rustbpe.
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# Offline machines cannot reach crates.io: build against Debian's packaged crates through a
# throwaway CARGO_HOME (kept inside .venv, never in the repo) whose config replaces crates-io.
if ! curl -sS --max-time 5 -o /dev/null https://index.crates.io/config.json 2>/dev/null; then
  echo "[setup] crates.io unreachable: using Debian's packaged crates (/usr/share/cargo/registry)"
  have_crates() {
    for c in pyo3-0.17 fancy-regex-0.7 rayon-1 ahash-0.7 smallvec-1; do
      compgen -G "/usr/share/cargo/registry/$c.*" >/dev/null || return 1
    done
  }
  if ! have_crates; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq librust-pyo3-dev librust-fancy-regex-dev \
        librust-rayon-dev librust-ahash-dev librust-smallvec-dev >/dev/null
    else
      echo "error: offline and Debian's Rust crates are missing. Install them (as root):" >&2
      echo "  apt-get install librust-pyo3-dev librust-fancy-regex-dev librust-rayon-dev librust-ahash-dev librust-smallvec-dev" >&2
      exit 1
    fi
  fi
  export CARGO_HOME="$VENV/cargo-offline"
  mkdir -p "$CARGO_HOME"
  cat > "$CARGO_HOME/config.toml" <<'TOML'
[source.crates-io]
replace-with = "debian"
[source.debian]
directory = "/usr/share/cargo/registry"
[net]
offline = true
TOML
  rm -f rustbpe/Cargo.lock   # a lock from a crates.io build would pin versions Debian lacks
fi
# pyo3 0.17 predates Python 3.12+; the abi3 build is forward compatible.
export PYO3_USE_ABI3_FORWARD_COMPATIBILITY=1

echo "[setup] installing nanochat (builds rustbpe with maturin)"
spec="."; [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
"$PY" -m pip install -q -e "$spec"
"$PY" -c "import rustbpe, nanochat, torch; print('[setup] ok: torch', torch.__version__)"
stamp_now > "$VENV/.nanochat_stamp"
