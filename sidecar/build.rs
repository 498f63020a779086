//! Links the release `mesh-proxy` with its hot code packed together.
//!
//! A proxy's resident memory is mostly its binary's code: the kernel maps a binary's pages in
//! 64 KiB runs around each page touched, so a few thousand functions run by a proxy, spread
//! across 9 MB of code, made most of the code resident. `hot-symbols.txt` lists the functions a
//! proxy runs (starting, registering, serving mTLS HTTP/2 and HTTP/1.1, opaque TCP, metrics),
//! recorded by `scripts/order-proxy-symbols`; the linker (LLD, Rust's default on x86_64 Linux)
//! places them first, so they share pages. The names are those of the release build, the
//! packages `scripts/lib/release-packages.sh` lists built together (as the release workflow,
//! `scripts/build-images --build` and `scripts/bench-proxy` build them): the packages a build
//! selects decide its dependencies' features, and with them many names. Names a build does not
//! have are skipped, so another build, or an old list, only packs less;
//! `scripts/order-proxy-symbols --check` says how many match.
//! `MESH_PROXY_SYMBOL_ORDER=off` links without it.

fn main() {
    println!("cargo:rerun-if-changed=hot-symbols.txt");
    println!("cargo:rerun-if-env-changed=MESH_PROXY_SYMBOL_ORDER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let lld_default = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if !release || !lld_default || var("MESH_PROXY_SYMBOL_ORDER") == "off" {
        return;
    }
    let list = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("hot-symbols.txt");
    println!(
        "cargo:rustc-link-arg-bin=mesh-proxy=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo:rustc-link-arg-bin=mesh-proxy=-Wl,--no-warn-symbol-ordering");
}
