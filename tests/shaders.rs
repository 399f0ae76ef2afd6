//! Every shader parses and validates with naga, without a GPU: a WGSL error fails here on any
//! machine instead of at pipeline creation on some adapter.

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
        if let Err(e) = v.validate(&module) {
            failures.push(format!("{name}: validate: {}", e.emit_to_string(src)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
