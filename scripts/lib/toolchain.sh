# Sourced by scripts: makes the Rust release pinned in rust-toolchain.toml available to rustup
# without a download. Offline machines carry that release as `stable`; this names it.
pinned_rust="$(awk -F'"' '/^channel/ { print $2 }' rust-toolchain.toml)"
if command -v rustup >/dev/null && ! rustup toolchain list | grep -q "^$pinned_rust-"; then
  stable_dir="$(rustup toolchain list -v | awk '/^stable-/ { print $NF; exit }')"
  if [[ -n "$stable_dir" ]] && "$stable_dir/bin/rustc" --version | grep -q " $pinned_rust "; then
    ln -s "$stable_dir" "$(dirname "$stable_dir")/$pinned_rust-$(basename "$stable_dir" | cut -d- -f2-)"
  fi
fi
