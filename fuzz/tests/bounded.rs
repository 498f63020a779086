//! A short fuzzing pass of every parser, in the suite: `MESH_FUZZ_INPUTS` inputs per target
//! (default 20,000) under an address-space limit; `scripts/fuzz` runs the long one.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[test]
fn no_parser_panics_or_allocates_without_bound() {
    mesh_fuzz::limit_memory(4 << 30).unwrap();
    let inputs: u32 = std::env::var("MESH_FUZZ_INPUTS")
        .ok()
        .map_or(20_000, |v| v.parse().expect("MESH_FUZZ_INPUTS is a number"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut failures = Vec::new();
    for target in mesh_fuzz::targets() {
        assert!(
            dir.join(target.name).is_dir(),
            "no committed seeds for {}",
            target.name
        );
        let report = mesh_fuzz::run(&target, &dir, inputs, 1);
        println!("{}: {} inputs", target.name, report.inputs);
        assert!(report.inputs >= u64::from(inputs), "{}", target.name);
        if let Some((input, why)) = report.failure {
            failures.push(format!(
                "{}: {why}; smallest input {:?}",
                target.name,
                String::from_utf8_lossy(&input)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The mutations reach the parsers' accepting paths, not only their first error: a run over
/// the seeds alone parses most of them.
#[test]
fn the_seeds_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let durations = mesh_fuzz::seeds(&dir, &target("duration"));
    assert!(durations.len() >= 3);
    for seed in durations {
        let text = String::from_utf8(seed).unwrap();
        assert!(mesh_core::duration::parse(text.trim()).is_ok(), "{text:?}");
    }
    for seed in mesh_fuzz::seeds(&dir, &target("prometheus-text")) {
        let text = String::from_utf8(seed).unwrap();
        assert!(!mesh_core::exposition::parse(&text).unwrap().is_empty());
    }
}

fn target(name: &str) -> mesh_fuzz::Target {
    mesh_fuzz::targets()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap()
}
