#!/usr/bin/env bash
# Install the peers svcd is benchmarked against, each apart from svcd and from each other:
#   Python peers   one venv each under bench/.work/venv-<peer> (supervisord's import name
#                  `supervisor` clashes with ours, and versions must not drift together)
#   PM2            `npm install` into bench/.work/node
#   nginx, wrk, hyperfine   Debian packages via apt-get (only when running as root)
# Idempotent: a peer already installed at the pinned version is left alone.
# Writes bench/.work/peers.env with the path of every tool for the bench scripts.
#
# usage: bench/peers/install.sh [--check] [PEER...]
#   PEER    any of: supervisor circus gunicorn uvicorn pm2 nginx wrk hyperfine
#           (default: all of them)
#   --check install nothing; report what is there; exit 1 if anything is missing
# env: PYTHON (default python3, must be >= 3.11), SVCD_BENCH_WORK (default bench/.work)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="$(dirname "$here")"
work="${SVCD_BENCH_WORK:-$bench/.work}"
python="${PYTHON:-python3}"

# Pinned so that a figure in bench/RESULTS.md can be reproduced: change a pin, rerun
# the benchmarks, and record the new version next to the new figures.
declare -A PY_SPEC=(
  [supervisor]="supervisor==4.3.0"
  [circus]="circus==0.19.0"
  [gunicorn]="gunicorn==27.0.1"
  # uvloop + httptools: uvicorn at its fastest, as the published comparisons run it
  [uvicorn]="uvicorn[standard]==0.54.0"
)
declare -A PY_IMPORT=([supervisor]=supervisor [circus]=circus [gunicorn]=gunicorn [uvicorn]=uvicorn)
declare -A PY_BIN=([supervisor]="supervisord supervisorctl" [circus]="circusd circusctl"
                   [gunicorn]="gunicorn" [uvicorn]="uvicorn")
PM2_VERSION="7.0.4"
declare -A APT_PKG=([nginx]=nginx [wrk]=wrk [hyperfine]=hyperfine)
ALL_PEERS=(supervisor circus gunicorn uvicorn pm2 nginx wrk hyperfine)

check_only=0
peers=()
for arg in "$@"; do
  case "$arg" in
    --check) check_only=1 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
    *)
      known=0
      for p in "${ALL_PEERS[@]}"; do [[ "$p" == "$arg" ]] && known=1; done
      if (( ! known )); then echo "install.sh: unknown peer $arg (${ALL_PEERS[*]})" >&2; exit 2; fi
      peers+=("$arg") ;;
  esac
done
(( ${#peers[@]} )) || peers=("${ALL_PEERS[@]}")

missing=()
declare -A FOUND=()

log() { printf 'peers: %s\n' "$*" >&2; }

mkdir -p "$work"
# Keep the work tree out of git even without a .gitignore entry.
[[ -f "$work/.gitignore" ]] || printf '*\n' > "$work/.gitignore"

# --- Python peers: one venv each ----------------------------------------------------
python_peer() {
  local name="$1" spec="${PY_SPEC[$1]}" venv="$work/venv-$1"
  local marker="$venv/.svcd-peer-spec"
  if [[ -f "$marker" && "$(cat "$marker")" == "$spec" ]] \
     && "$venv/bin/python" -c "import ${PY_IMPORT[$name]}" 2>/dev/null; then
    log "$name: $spec already in $venv"
  elif (( check_only )); then
    log "$name: missing ($spec)"; missing+=("$name"); return
  else
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      log "$name: $python is older than 3.11"; missing+=("$name"); return
    fi
    log "$name: installing $spec into $venv"
    # --clear: a venv holding another version is rebuilt, not patched.
    "$python" -m venv --clear "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec"
    printf '%s' "$spec" > "$marker"
  fi
  local bin
  for bin in ${PY_BIN[$name]}; do FOUND[$bin]="$venv/bin/$bin"; done
}

# --- PM2: npm into its own prefix ----------------------------------------------------
pm2_peer() {
  local prefix="$work/node" pkg="$work/node/node_modules/pm2/package.json"
  local have=""
  [[ -f "$pkg" ]] && have="$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$pkg" | head -n1)"
  if [[ "$have" == "$PM2_VERSION" ]]; then
    log "pm2: $PM2_VERSION already in $prefix"
  elif (( check_only )); then
    log "pm2: missing (pm2@$PM2_VERSION)"; missing+=(pm2); return
  elif ! command -v npm >/dev/null; then
    log "pm2: npm not found (Debian: apt-get install nodejs npm)"; missing+=(pm2); return
  else
    log "pm2: installing pm2@$PM2_VERSION into $prefix"
    mkdir -p "$prefix"
    npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "pm2@$PM2_VERSION"
  fi
  FOUND[pm2]="$prefix/node_modules/.bin/pm2"
  # PM2 keeps its daemon state in PM2_HOME (default ~/.pm2): keep it in the work tree.
  FOUND[PM2_HOME]="$work/pm2-home"
}

# --- Debian packages: nginx, wrk, hyperfine --------------------------------------------
apt_wanted=()
apt_peer() {
  local name="$1" path
  path="$(command -v "$name" || true)"
  [[ -z "$path" && -x "/usr/sbin/$name" ]] && path="/usr/sbin/$name"
  if [[ -n "$path" ]]; then
    log "$name: $path"; FOUND[$name]="$path"
  else
    apt_wanted+=("$name")
  fi
}

apt_install() {
  (( ${#apt_wanted[@]} )) || return 0
  local pkgs=() name
  for name in "${apt_wanted[@]}"; do pkgs+=("${APT_PKG[$name]}"); done
  if (( check_only )); then
    log "missing: ${pkgs[*]} (apt-get install ${pkgs[*]})"; missing+=("${apt_wanted[@]}"); return
  fi
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    log "not root or no apt-get: run as root: apt-get install -y ${pkgs[*]}"
    missing+=("${apt_wanted[@]}"); return
  fi
  log "apt-get install ${pkgs[*]}"
  # Debian's nginx starts itself on :80 at install; a benchmark host wants it stopped.
  # policy-rc.d (exit 101) tells invoke-rc.d not to start services; only ours is removed.
  local policy=/usr/sbin/policy-rc.d placed=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 0755 "$policy" && placed=1
  fi
  local rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } \
    || rc=$?
  (( placed )) && rm -f "$policy"
  if (( rc )); then log "apt-get failed ($rc)"; missing+=("${apt_wanted[@]}"); return; fi
  for name in "${apt_wanted[@]}"; do
    local path
    path="$(command -v "$name" || true)"
    [[ -z "$path" && -x "/usr/sbin/$name" ]] && path="/usr/sbin/$name"
    if [[ -n "$path" ]]; then FOUND[$name]="$path"; else missing+=("$name"); fi
  done
}

for peer in "${peers[@]}"; do
  case "$peer" in
    supervisor|circus|gunicorn|uvicorn) python_peer "$peer" ;;
    pm2) pm2_peer ;;
    nginx|wrk|hyperfine) apt_peer "$peer" ;;
  esac
done
apt_install

# --- peers.env: what the bench scripts source ----------------------------------------
env_file="$work/peers.env"
{
  echo "# written by bench/peers/install.sh; source it from the bench scripts"
  for key in $(printf '%s\n' "${!FOUND[@]}" | sort); do
    var="$(printf '%s' "$key" | tr '[:lower:]-' '[:upper:]_')"
    [[ "$var" == PM2_HOME ]] || var="PEER_$var"
    printf 'export %s=%q\n' "$var" "${FOUND[$key]}"
  done
} > "$env_file.tmp"
if (( ! check_only )); then
  # Merge with what an earlier run found, so installing one peer keeps the others.
  if [[ -f "$env_file" ]]; then
    grep -v '^#' "$env_file" | while IFS= read -r line; do
      grep -q "^${line%%=*}=" "$env_file.tmp" || printf '%s\n' "$line" >> "$env_file.tmp"
    done
  fi
  mv "$env_file.tmp" "$env_file"
  log "wrote $env_file"
else
  rm -f "$env_file.tmp"
fi

if (( ${#missing[@]} )); then
  log "not available: ${missing[*]}"
  exit 1
fi
log "all requested peers are installed"
