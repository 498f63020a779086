# Sourced by scripts: the packages a release build selects, together, in one `cargo build`.
# Which packages a build selects decides the features of the dependencies they share, and with
# them most of the release mesh-proxy's symbol names; sidecar/hot-symbols.txt (the functions
# linked first, see sidecar/build.rs) lists the names of this build. So every release-profile
# build of the proxy that ships or is measured selects exactly these: the release workflow,
# scripts/build-images --build, scripts/bench-proxy, scripts/order-proxy-symbols and
# scripts/heap-profile-proxy. A build of mesh-sidecar alone names many functions differently
# and packs only those it shares (46 % of the list, measured).
# shellcheck disable=SC2034 # used by the scripts that source this
release_packages=(-p mesh-cli -p mesh-sidecar -p mesh-controlplane -p mesh-rollout-controller -p mesh-demo)
