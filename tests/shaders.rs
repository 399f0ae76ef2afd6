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
