//! Writes every mesh CRD to `crds/yaml/<kind>.yaml` (or the directory given as the only
//! argument). `crds/tests/drift.rs` fails when the committed files differ from what this writes.

use std::path::PathBuf;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("yaml"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (file, crd) in mesh_crds::all() {
        let path = dir.join(file);
        std::fs::write(&path, mesh_crds::to_yaml(&crd)?)
            .with_context(|| format!("writing {}", path.display()))?;
        #[allow(clippy::print_stdout, reason = "crdgen reports what it wrote")]
        {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
