#!/usr/bin/env bash
# Puts the mesh CLI on PATH for the action (action.yml), one of three ways:
#   - mesh-binary: a CLI an earlier step built or installed;
#   - mesh-version: source: `cargo build` from the action's own checkout;
#   - a released version: the archive for this runner's OS and architecture, from the release
#     download URL derived from the version, accepted only when its SHA-256 matches the sum
#     committed in action/checksums/v<version>.sha256 (the release workflow writes those files).
#     Verified binaries are kept in $RUNNER_TOOL_CACHE/mesh/<version>/<target>/<sha256>/, so later
#     runs on the same runner download nothing.
#
# Environment (set by action.yml from its inputs):
#   MESH_BINARY        path of an existing mesh CLI
#   MESH_VERSION       "source", a version (0.2.0 or v0.2.0), or empty for the newest one with a
#                      committed checksum file
#   MESH_DOWNLOAD_URL  base URL of the releases; default
#                      $GITHUB_SERVER_URL/$GITHUB_ACTION_REPOSITORY/releases/download
#   MESH_ACTION_CHECKSUMS_DIR
#                      where the trusted sums are read from; default action/checksums/ in the
#                      action's checkout. Only the action's own tests point it elsewhere.
# Writes `mesh-path=<path>` to $GITHUB_OUTPUT and the CLI's directory to $GITHUB_PATH.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${GITHUB_ACTION_PATH:-$here/..}"
root="${root%/}"
checksums_dir="${MESH_ACTION_CHECKSUMS_DIR:-$root/action/checksums}"

die() {
  # An annotation for the run's page, and the same line for a person reading the log.
  echo "::error title=mesh action: installing the CLI::$*"
  echo "mesh action: $*" >&2
  exit 1
}

publish() {
  local bin="$1"
  "$bin" --version >/dev/null 2>&1 || die "$bin does not run (\`$bin --version\` failed)"
  if [[ -n "${GITHUB_OUTPUT:-}" ]]; then echo "mesh-path=$bin" >>"$GITHUB_OUTPUT"; fi
  if [[ -n "${GITHUB_PATH:-}" ]]; then dirname "$bin" >>"$GITHUB_PATH"; fi
  echo "using $("$bin" --version) at $bin"
}

sha256() {
  if command -v sha256sum >/dev/null; then
    sha256sum "$1" | cut -d' ' -f1
  elif command -v shasum >/dev/null; then
    shasum -a 256 "$1" | cut -d' ' -f1
  else
    die "neither sha256sum nor shasum is installed; the download cannot be checked"
  fi
}

# The release target triple of this runner, as release.yml names its archives.
runner_target() {
  local os="${RUNNER_OS:-$(uname -s)}" arch="${RUNNER_ARCH:-$(uname -m)}"
  case "$os/$arch" in
    Linux/X64 | Linux/x86_64) echo x86_64-unknown-linux-gnu ;;
    Linux/ARM64 | Linux/aarch64 | Linux/arm64) echo aarch64-unknown-linux-gnu ;;
    macOS/X64 | Darwin/x86_64) echo x86_64-apple-darwin ;;
    macOS/ARM64 | Darwin/arm64 | Darwin/aarch64) echo aarch64-apple-darwin ;;
    *) die "no released mesh binary for $os/$arch (there are Linux x86_64/aarch64 and macOS x86_64/arm64); use mesh-version: source" ;;
  esac
}

if [[ -n "${MESH_BINARY:-}" ]]; then
  [[ -x "$MESH_BINARY" ]] || die "mesh-binary $MESH_BINARY is not an executable file"
  publish "$(cd "$(dirname "$MESH_BINARY")" && pwd)/$(basename "$MESH_BINARY")"
  exit 0
fi

version="${MESH_VERSION:-}"
if [[ "$version" == source ]]; then
  command -v cargo >/dev/null || die "mesh-version: source builds with cargo, which is not installed (rustup.rs)"
  echo "building the mesh CLI from $root"
  (cd "$root" && cargo build --locked -p mesh-cli --bin mesh >&2) || die "cargo build of the mesh CLI in $root failed"
  target_dir="${CARGO_TARGET_DIR:-$root/target}"
  publish "$target_dir/debug/mesh"
  exit 0
fi

if [[ -z "$version" ]]; then
  version="$(find "$checksums_dir" -maxdepth 1 -name 'v*.sha256' 2>/dev/null |
    sed -e 's|.*/v||' -e 's|\.sha256$||' | sort -V | tail -n 1)"
  [[ -n "$version" ]] || die "this checkout of the action pins no released version (no v*.sha256 in $checksums_dir); set mesh-version to a released version, to source, or set mesh-binary"
fi
version="${version#v}"
[[ "$version" =~ ^[0-9A-Za-z][0-9A-Za-z.+-]*$ ]] || die "mesh-version \"$version\" is not a version (e.g. 0.2.0), \"source\", or empty"

sums="$checksums_dir/v$version.sha256"
[[ -f "$sums" ]] || die "mesh v$version has no committed checksums ($sums is missing): the action downloads only versions whose SHA-256 sums ship with it; use a newer ref of the action, mesh-version: source, or mesh-binary"
target="$(runner_target)"
archive="mesh-v$version-$target.tar.gz"
want="$(awk -v f="$archive" '$2 == f || $2 == "*" f { print $1 }' "$sums")"
[[ "$want" =~ ^[0-9a-f]{64}$ ]] || die "$sums has no SHA-256 for $archive"

cache="${RUNNER_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}}/mesh/$version/$target/$want"
if [[ -x "$cache/mesh" && -f "$cache/.verified" ]]; then
  echo "mesh v$version ($target) from the tool cache"
  publish "$cache/mesh"
  exit 0
fi

base="${MESH_DOWNLOAD_URL:-}"
if [[ -z "$base" ]]; then
  [[ -n "${GITHUB_ACTION_REPOSITORY:-}" ]] || die "cannot tell which repository's releases to download from (GITHUB_ACTION_REPOSITORY is empty, as for a local action); set download-url"
  base="${GITHUB_SERVER_URL:-https://github.com}/$GITHUB_ACTION_REPOSITORY/releases/download"
fi
url="${base%/}/v$version/$archive"
command -v curl >/dev/null || die "curl is needed to download $url"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "downloading $url"
curl --fail --silent --show-error --location --retry 3 --output "$work/$archive" "$url" ||
  die "downloading $url failed"
got="$(sha256 "$work/$archive")"
[[ "$got" == "$want" ]] ||
  die "checksum mismatch for $archive from $url: got sha256 $got, but $sums pins $want; the download was discarded"
mkdir -p "$work/x"
tar -xzf "$work/$archive" -C "$work/x" || die "$archive from $url is not a gzip'd tar archive"
[[ -x "$work/x/mesh" ]] || die "$archive holds no executable mesh at its top level"

# Into the cache by rename, so a concurrent job never sees half a directory.
mkdir -p "$(dirname "$cache")"
touch "$work/x/.verified"
mv "$work/x" "$cache.partial.$$"
if [[ -d "$cache" ]] || ! mv "$cache.partial.$$" "$cache" 2>/dev/null; then
  rm -rf "$cache.partial.$$" # another job put the same verified archive there first
fi
publish "$cache/mesh"
