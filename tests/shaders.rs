//! Every shader parses, validates and translates to SPIR-V with naga, without a GPU: a WGSL error
//! (or a construct naga's SPIR-V writer refuses) fails here on any machine instead of at pipeline
//! creation on some adapter; the cooperative-matrix modules included, which the CI's software
//! adapter never compiles.

#[test]
fn every_shader_validates() {
    let mut failures = Vec::new();
    let modules = wgpress::shaders::all_modules();
    assert!(modules.len() >= 20, "expected all matmul variants too");
    for (name, src, _coop) in &modules {
        let module = match naga::front::wgsl::parse_str(src) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{name}: parse: {}", e.emit_to_string(src)));
                continue;
            }
        };
        let mut v = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        );
        let info = match v.validate(&module) {
            Ok(i) => i,
            Err(e) => {
                failures.push(format!("{name}: validate: {}", e.emit_to_string(src)));
                continue;
            }
        };
        // Bounds checks as the test suite's checked pipelines get them (clamped indices).
        let policy = naga::proc::BoundsCheckPolicy::Restrict;
        let opts = naga::back::spv::Options {
            lang_version: (1, 3),
            bounds_check_policies: naga::proc::BoundsCheckPolicies {
                index: policy,
                buffer: policy,
                image_load: policy,
                binding_array: policy,
            },
            ..Default::default()
        };
        let spv =
            std::panic::catch_unwind(|| naga::back::spv::write_vec(&module, &info, &opts, None));
        match spv {
            Ok(Ok(words)) => assert!(words.len() > 5, "{name}: empty SPIR-V"),
            Ok(Err(e)) => failures.push(format!("{name}: SPIR-V: {e}")),
            Err(_) => failures.push(format!("{name}: the SPIR-V writer panicked")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Workgroup memory per entry point of every portable (non-cooperative) module stays within
/// 32 KiB: what wgpu reports on lavapipe and what Apple GPUs have (`potrf_diag` once needed
/// 33 280 bytes). The cooperative modules' tiles are checked against the adapter's limit on the
/// host. Counted as naga lays the arrays out, from the globals each entry point uses.
#[test]
fn portable_kernels_fit_32_kib_of_workgroup_memory() {
    const LIMIT: u32 = 32 * 1024;
    let mut over = Vec::new();
    let mut counted = 0;
    for (name, src, coop) in wgpress::shaders::all_modules() {
        if coop {
            continue;
        }
        let module =
            naga::front::wgsl::parse_str(&src).expect("validated by every_shader_validates");
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .expect("validated by every_shader_validates");
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        for (i, ep) in module.entry_points.iter().enumerate() {
            let uses = info.get_entry_point(i);
            let bytes: u32 = module
                .global_variables
                .iter()
                .filter(|(h, g)| g.space == naga::AddressSpace::WorkGroup && !uses[*h].is_empty())
                .map(|(_, g)| layouter[g.ty].size)
                .sum();
            counted += 1;
            if bytes > LIMIT {
                over.push(format!("{name} {}: {bytes} bytes", ep.name));
            }
        }
    }
    assert!(counted >= 20, "only {counted} entry points counted");
    assert!(
        over.is_empty(),
        "over {LIMIT} bytes of workgroup memory:\n{}",
        over.join("\n")
    );
}
