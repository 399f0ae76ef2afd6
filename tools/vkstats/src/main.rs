//! vkstats: compile a WGSL compute shader to SPIR-V exactly as wgpu-hal 30.0.1's Vulkan backend
//! does, build a compute pipeline from it with `VK_KHR_pipeline_executable_properties` capture
//! flags, and print what the driver reports (registers, shared memory, spills, ...), optionally
//! with the driver's internal representations (its IR / assembly).
//!
//! See README.md for the wgpu-hal code this mirrors.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use ash::vk;
use naga::back::spv;

const USAGE: &str = "\
usage: vkstats FILE.wgsl [options]

For each compute entry point of FILE.wgsl, compile WGSL -> SPIR-V as wgpu-hal 30.0.1 (Vulkan)
does, create the compute pipeline with VK_KHR_pipeline_executable_properties and print the
driver's executables and statistics.

options:
  --entry NAME            only this entry point (repeatable; default: every compute entry point)
  --checked               wgpu's default checked shader (ShaderRuntimeChecks::checked());
                          default: create_shader_module_trusted(.., ShaderRuntimeChecks::unchecked())
  --unchecked             force the unchecked options (overrides a dump header, see below)
  --zero-init MODE        native | polyfill | none   (default native: wgpu's choice on a device
                          with shaderZeroInitializeWorkgroupMemory; none = compilation_options
                          .zero_initialize_workgroup_memory = false)
  --override NAME=VALUE   pipeline-overridable constant (repeatable)
  --ir DIR                also capture the driver's internal representations, written to
                          DIR/<entry>.<executable>.<name>.txt|.bin
  --spv DIR               write the SPIR-V handed to the driver to DIR/<entry>.spv
  --device N              Vulkan physical device index (default: first discrete GPU, else 0)
  --debug                 naga WriterFlags::DEBUG + debug info, as wgpu with InstanceFlags::DEBUG
                          (the default in debug builds of wgpu); default off (release builds)
  --no-robust             do NOT enable robustBufferAccess / robustBufferAccess2 /
                          robustImageAccess (wgpu enables them; this shows what they cost)
  -h, --help              this text

A file written by wgpress with WGPRESS_DUMP_SHADERS set starts with
`// wgpress pipeline KEY/ENTRY/UNCHECKED`; its entry point and checked mode are then the defaults.
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ZeroInit {
    Native,
    Polyfill,
    None,
}

struct Args {
    file: PathBuf,
    entries: Vec<String>,
    checked: Option<bool>,
    zero_init: ZeroInit,
    ir_dir: Option<PathBuf>,
    spv_dir: Option<PathBuf>,
    device: Option<usize>,
    overrides: Vec<(String, f64)>,
    debug: bool,
    no_robust: bool,
}

fn parse_args() -> Result<Option<Args>> {
    let mut it = std::env::args().skip(1);
    let mut file = None;
    let mut a = Args {
        file: PathBuf::new(),
        entries: Vec::new(),
        checked: None,
        zero_init: ZeroInit::Native,
        ir_dir: None,
        spv_dir: None,
        device: None,
        overrides: Vec::new(),
        debug: false,
        no_robust: false,
    };
    while let Some(arg) = it.next() {
        // Accept both `--opt value` and `--opt=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().ok_or_else(|| anyhow!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "--entry" => a.entries.push(value("--entry")?),
            "--checked" => a.checked = Some(true),
            "--unchecked" => a.checked = Some(false),
            "--zero-init" => {
                a.zero_init = match value("--zero-init")?.as_str() {
                    "native" => ZeroInit::Native,
                    "polyfill" => ZeroInit::Polyfill,
                    "none" => ZeroInit::None,
                    other => bail!("--zero-init: expected native, polyfill or none, got {other:?}"),
                }
            }
            "--override" => {
                let v = value("--override")?;
                let (name, num) = v
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--override: expected NAME=VALUE, got {v:?}"))?;
                let num: f64 = num
                    .parse()
                    .with_context(|| format!("--override {name}: {num:?} is not a number"))?;
                a.overrides.push((name.to_string(), num));
            }
            "--ir" => a.ir_dir = Some(value("--ir")?.into()),
            "--spv" => a.spv_dir = Some(value("--spv")?.into()),
            "--device" => {
                let v = value("--device")?;
                a.device = Some(
                    v.parse()
                        .with_context(|| format!("--device: {v:?} is not an index"))?,
                );
            }
            "--debug" => a.debug = true,
            "--no-robust" => a.no_robust = true,
            f if f.starts_with('-') && f.len() > 1 => bail!("unknown option {f}\n\n{USAGE}"),
            _ => {
                if file.is_some() {
                    bail!("more than one input file given ({arg})\n\n{USAGE}");
                }
                file = Some(PathBuf::from(arg));
            }
        }
    }
    a.file = file.ok_or_else(|| anyhow!("no input file\n\n{USAGE}"))?;
    Ok(Some(a))
}

/// The extension feature structs vkstats queries and then enables exactly as queried.
#[derive(Default)]
struct Features {
    v11: vk::PhysicalDeviceVulkan11Features<'static>,
    v12: vk::PhysicalDeviceVulkan12Features<'static>,
    v13: vk::PhysicalDeviceVulkan13Features<'static>,
    coop: vk::PhysicalDeviceCooperativeMatrixFeaturesKHR<'static>,
    pepf: vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR<'static>,
    rob2: vk::PhysicalDeviceRobustness2FeaturesEXT<'static>,
}

impl Features {
    /// `f2` with the structs the device has chained behind it, for the query and again for
    /// vkCreateDevice. `has`: (pipeline executable properties, Vulkan 1.3, cooperative matrices,
    /// robustness2).
    fn chain<'a>(
        &'a mut self,
        f2: vk::PhysicalDeviceFeatures2<'a>,
        (pep, v13, coop, rob2): (bool, bool, bool, bool),
    ) -> vk::PhysicalDeviceFeatures2<'a> {
        self.v11.p_next = std::ptr::null_mut();
        self.v12.p_next = std::ptr::null_mut();
        self.v13.p_next = std::ptr::null_mut();
        self.coop.p_next = std::ptr::null_mut();
        self.pepf.p_next = std::ptr::null_mut();
        self.rob2.p_next = std::ptr::null_mut();
        let mut f2 = f2.push_next(&mut self.v11).push_next(&mut self.v12);
        if pep {
            f2 = f2.push_next(&mut self.pepf);
        }
        if v13 {
            f2 = f2.push_next(&mut self.v13);
        }
        if coop {
            f2 = f2.push_next(&mut self.coop);
        }
        if rob2 {
            f2 = f2.push_next(&mut self.rob2);
        }
        f2
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vkstats: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("vkstats: {failed} entry point(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            report("vkstats: error", &e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error with its chain of causes (without a backtrace, even under RUST_BACKTRACE).
fn report(prefix: &str, e: &anyhow::Error) {
    eprintln!("{prefix}: {e}");
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        let mut lines = text.lines();
        if let Some(first) = lines.next() {
            eprintln!("  caused by: {first}");
        }
        for l in lines {
            eprintln!("    {l}");
        }
    }
}

/// Returns the number of entry points that failed.
fn run(args: &Args) -> Result<usize> {
    let path = args.file.display().to_string();
    let source =
        std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {path}"))?;

    // A wgpress shader dump: `// wgpress pipeline KEY/ENTRY/UNCHECKED (key/entry/unchecked)`.
    let mut entries = args.entries.clone();
    let mut checked = args.checked;
    if let Some(rest) = source
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("// wgpress pipeline "))
    {
        let full_key = rest.split_whitespace().next().unwrap_or("");
        let mut parts = full_key.rsplitn(3, '/');
        if let (Some(unchecked), Some(entry), Some(_key)) =
            (parts.next(), parts.next(), parts.next())
        {
            if entries.is_empty() {
                entries.push(entry.to_string());
            }
            if checked.is_none() {
                checked = Some(unchecked != "true");
            }
            println!(
                "wgpress dump header: {full_key} -> entry {}, {}",
                entries.join(","),
                if checked == Some(true) {
                    "checked"
                } else {
                    "unchecked"
                }
            );
        }
    }
    let checked = checked.unwrap_or(false);

    // Front end + validation, as wgpu-core's Device::create_shader_module (with every naga
    // capability allowed: f16, subgroups, cooperative matrices, ...).
    let mut fe_options = naga::front::wgsl::Options::new();
    fe_options.capabilities = naga::valid::Capabilities::all();
    let module = naga::front::wgsl::Frontend::new_with_options(fe_options)
        .parse(&source)
        .map_err(|e| anyhow!("{}", e.emit_to_string_with_path(&source, &path)))
        .with_context(|| format!("{path}: WGSL parse failed"))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| anyhow!("{}", e.emit_to_string_with_path(&source, &path)))
    .with_context(|| format!("{path}: naga validation failed"))?;

    let computes: Vec<&str> = module
        .entry_points
        .iter()
        .filter(|ep| ep.stage == naga::ShaderStage::Compute)
        .map(|ep| ep.name.as_str())
        .collect();
    if entries.is_empty() {
        if computes.is_empty() {
            bail!("{path}: no compute entry point");
        }
        entries = computes.iter().map(|s| s.to_string()).collect();
    } else {
        for e in &entries {
            if !computes.contains(&e.as_str()) {
                bail!(
                    "{path}: no compute entry point {e:?} (compute entry points: {})",
                    computes.join(", ")
                );
            }
        }
    }
    println!(
        "{path}: {} bytes of WGSL, compute entry points: {}",
        source.len(),
        computes.join(", ")
    );

    let gpu = Gpu::new(args.device, args.no_robust)?;
    let opts = NagaOpts::new(&gpu.caps, args, checked);
    opts.print(checked);

    let mut constants = naga::back::PipelineConstants::default();
    for (k, v) in &args.overrides {
        constants.insert(k.clone(), *v);
    }

    let mut failed = 0;
    for entry in &entries {
        println!();
        println!("=== {path} :: {entry} ===");
        if let Err(e) = process_entry(
            &gpu, &opts, args, &module, &info, &source, entry, &constants,
        ) {
            report(&format!("vkstats: error: {path} :: {entry}"), &e);
            failed += 1;
        }
    }
    Ok(failed)
}

// ---------------------------------------------------------------------------------------------
// Vulkan instance / device

/// What the chosen device supports, as wgpu-hal 30.0.1 would see it for the features wgpress
/// requests (SHADER_F16, SUBGROUP, EXPERIMENTAL_COOPERATIVE_MATRIX; see src/gpu/context.rs).
#[derive(Debug, Default, Clone)]
struct Caps {
    api_version: u32,
    vendor_id: u32,
    image_cube_array: bool,
    sample_rate_shading: bool,
    /// wgt::Features::SUBGROUP (adapter.rs ~897-914).
    subgroup: bool,
    subgroup_size_control: bool,
    /// wgt::Features::SHADER_F16 (adapter.rs ~885-894).
    shader_f16: bool,
    storage_input_output16: bool,
    /// wgt::Features::EXPERIMENTAL_COOPERATIVE_MATRIX (adapter.rs ~1088-1096) and wgpress's own
    /// check for a 16x16x16 f16 x f16 -> f32 configuration.
    coop_matrix: bool,
    integer_dot_product: bool,
    shader_int8: bool,
    zero_init_native: bool,
    /// Enabled on the device we created (wgpu enables them whenever supported).
    robust_buffer_access2: bool,
    robust_image_access: bool,
}

struct Instance {
    entry: ash::Entry,
    raw: ash::Instance,
}

impl Drop for Instance {
    fn drop(&mut self) {
        unsafe { self.raw.destroy_instance(None) };
    }
}

struct Gpu {
    // Field order = drop order: the device goes before the instance.
    device: ash::Device,
    /// None when the driver lacks VK_KHR_pipeline_executable_properties.
    pep: Option<ash::khr::pipeline_executable_properties::Device>,
    caps: Caps,
    _instance: Instance,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        unsafe {
            let _ = self.device.device_wait_idle();
            self.device.destroy_device(None);
        }
    }
}

fn c_str(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn version(v: u32) -> String {
    format!(
        "{}.{}.{}",
        vk::api_version_major(v),
        vk::api_version_minor(v),
        vk::api_version_patch(v)
    )
}

/// `VkComponentTypeKHR`, including values newer than ash 0.38's headers.
fn component(t: vk::ComponentTypeKHR) -> String {
    match t.as_raw() {
        1000141000 => "BFLOAT16".into(),
        1000491000 => "SINT8_PACKED_NV".into(),
        1000491001 => "UINT8_PACKED_NV".into(),
        1000491002 => "FLOAT8_E4M3_EXT".into(),
        1000491003 => "FLOAT8_E5M2_EXT".into(),
        _ => format!("{t:?}"),
    }
}

fn b(v: vk::Bool32) -> bool {
    v != vk::FALSE
}

impl Gpu {
    fn new(device_index: Option<usize>, no_robust: bool) -> Result<Gpu> {
        let entry = unsafe { ash::Entry::load() }.context(
            "cannot load the Vulkan loader (libvulkan.so.1); is a Vulkan driver installed?",
        )?;
        let loader_version = unsafe { entry.try_enumerate_instance_version() }
            .context("vkEnumerateInstanceVersion")?
            .unwrap_or(vk::API_VERSION_1_0);
        if loader_version < vk::API_VERSION_1_3 {
            bail!(
                "the Vulkan loader supports instance version {} only; vkstats needs 1.3",
                version(loader_version)
            );
        }
        let app = vk::ApplicationInfo::default()
            .application_name(c"vkstats")
            .engine_name(c"vkstats")
            .api_version(vk::API_VERSION_1_3);
        let raw = unsafe {
            entry.create_instance(
                &vk::InstanceCreateInfo::default().application_info(&app),
                None,
            )
        }
        .context("vkCreateInstance (API 1.3)")?;
        let instance = Instance { entry, raw };
        let inst = &instance.raw;

        let pds =
            unsafe { inst.enumerate_physical_devices() }.context("vkEnumeratePhysicalDevices")?;
        if pds.is_empty() {
            bail!("no Vulkan physical device found");
        }
        let mut props = Vec::new();
        for &pd in &pds {
            let p = unsafe { inst.get_physical_device_properties(pd) };
            let (driver, info) = if p.api_version >= vk::API_VERSION_1_2 {
                let mut drv = vk::PhysicalDeviceDriverProperties::default();
                let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut drv);
                unsafe { inst.get_physical_device_properties2(pd, &mut p2) };
                (c_str(&drv.driver_name), c_str(&drv.driver_info))
            } else {
                ("?".to_string(), "?".to_string())
            };
            props.push((p, driver, info));
        }
        let chosen = match device_index {
            Some(n) if n < pds.len() => n,
            Some(n) => bail!("--device {n}: there are only {} Vulkan devices", pds.len()),
            None => props
                .iter()
                .position(|(p, ..)| p.device_type == vk::PhysicalDeviceType::DISCRETE_GPU)
                .unwrap_or(0),
        };
        println!("Vulkan devices (loader {}):", version(loader_version));
        for (i, (p, driver, info)) in props.iter().enumerate() {
            println!(
                "  {} [{i}] {} ({:?}, vendor {:#06x} device {:#06x}), API {}, driver {driver} {info} (version {:#x})",
                if i == chosen { "*" } else { " " },
                c_str(&p.device_name),
                p.device_type,
                p.vendor_id,
                p.device_id,
                version(p.api_version),
                p.driver_version,
            );
        }
        let pd = pds[chosen];
        let (p, ..) = &props[chosen];
        let name = c_str(&p.device_name);
        let api = p.api_version;
        if api < vk::API_VERSION_1_2 {
            bail!(
                "device {chosen} ({name}) reports Vulkan {}; vkstats needs 1.2+",
                version(api)
            );
        }

        // Extensions.
        let exts = unsafe { inst.enumerate_device_extension_properties(pd) }
            .context("vkEnumerateDeviceExtensionProperties")?;
        let has = |n: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
        let pep_name = ash::khr::pipeline_executable_properties::NAME;
        let coop_name = ash::khr::cooperative_matrix::NAME;
        let rob2_name = ash::ext::robustness2::NAME;
        let has_pep = has(pep_name);
        if !has_pep {
            println!(
                "  WARNING: device {chosen} ({name}) does not support {}: shaders are still compiled and \
                 pipelines created, but no statistics can be read (every entry point will fail)",
                pep_name.to_string_lossy()
            );
        }
        let has_coop = has(coop_name);
        let has_rob2 = has(rob2_name);
        let mut ext_names = Vec::new();
        if has_pep {
            ext_names.push(pep_name.as_ptr());
        }
        if has_coop {
            ext_names.push(coop_name.as_ptr());
        }
        // wgpu-hal enables VK_EXT_robustness2 whenever present (adapter.rs ~1334-1337).
        if has_rob2 {
            ext_names.push(rob2_name.as_ptr());
        }

        // Properties: subgroups.
        let mut v11p = vk::PhysicalDeviceVulkan11Properties::default();
        let mut v13p = vk::PhysicalDeviceVulkan13Properties::default();
        {
            let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut v11p);
            if api >= vk::API_VERSION_1_3 {
                p2 = p2.push_next(&mut v13p);
            }
            unsafe { inst.get_physical_device_properties2(pd, &mut p2) };
        }

        // Features: query everything the device supports, then enable exactly that.
        let mut feats = Features::default();
        let has = (has_pep, api >= vk::API_VERSION_1_3, has_coop, has_rob2);
        let mut core = {
            let mut f2 = feats.chain(vk::PhysicalDeviceFeatures2::default(), has);
            unsafe { inst.get_physical_device_features2(pd, &mut f2) };
            f2.features
        };
        if has_pep && !b(feats.pepf.pipeline_executable_info) {
            bail!(
                "device {chosen} ({name}) lists VK_KHR_pipeline_executable_properties but not its \
                 pipelineExecutableInfo feature"
            );
        }
        if no_robust {
            core.robust_buffer_access = vk::FALSE;
            feats.rob2.robust_buffer_access2 = vk::FALSE;
            feats.rob2.robust_image_access2 = vk::FALSE;
            feats.v13.robust_image_access = vk::FALSE;
        }

        let ci = ash::khr::cooperative_matrix::Instance::new(&instance.entry, inst);
        let coop_props = if has_coop {
            unsafe { ci.get_physical_device_cooperative_matrix_properties(pd) }
                .context("vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR")?
        } else {
            Vec::new()
        };

        let subgroup_ops = vk::SubgroupFeatureFlags::BASIC
            | vk::SubgroupFeatureFlags::VOTE
            | vk::SubgroupFeatureFlags::ARITHMETIC
            | vk::SubgroupFeatureFlags::BALLOT
            | vk::SubgroupFeatureFlags::SHUFFLE
            | vk::SubgroupFeatureFlags::SHUFFLE_RELATIVE
            | vk::SubgroupFeatureFlags::QUAD;
        let wgpress_coop = coop_props.iter().any(|p| {
            p.scope == vk::ScopeKHR::SUBGROUP
                && (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                && p.a_type == vk::ComponentTypeKHR::FLOAT16
                && p.b_type == vk::ComponentTypeKHR::FLOAT16
                && p.c_type == vk::ComponentTypeKHR::FLOAT32
                && p.result_type == vk::ComponentTypeKHR::FLOAT32
        });
        let caps = Caps {
            api_version: api,
            vendor_id: p.vendor_id,
            image_cube_array: b(core.image_cube_array),
            sample_rate_shading: b(core.sample_rate_shading),
            subgroup: api >= vk::API_VERSION_1_3
                && v11p.subgroup_supported_operations.contains(subgroup_ops)
                && v11p
                    .subgroup_supported_stages
                    .contains(vk::ShaderStageFlags::COMPUTE | vk::ShaderStageFlags::FRAGMENT),
            subgroup_size_control: b(feats.v13.subgroup_size_control),
            shader_f16: b(feats.v12.shader_float16)
                && b(feats.v11.storage_buffer16_bit_access)
                && b(feats.v11.uniform_and_storage_buffer16_bit_access),
            storage_input_output16: b(feats.v11.storage_input_output16),
            coop_matrix: has_coop
                && b(feats.coop.cooperative_matrix)
                && !coop_props.is_empty()
                && b(feats.v12.vulkan_memory_model)
                && b(feats.v12.vulkan_memory_model_device_scope)
                && wgpress_coop,
            integer_dot_product: b(feats.v13.shader_integer_dot_product),
            shader_int8: b(feats.v12.shader_int8),
            zero_init_native: b(feats.v13.shader_zero_initialize_workgroup_memory),
            robust_buffer_access2: has_rob2 && b(feats.rob2.robust_buffer_access2),
            robust_image_access: if has_rob2 {
                b(feats.rob2.robust_image_access2)
            } else {
                b(feats.v13.robust_image_access)
            },
        };

        println!(
            "using device {chosen}: {name}; subgroup size {} (min {}, max {}), max {} subgroups/workgroup",
            v11p.subgroup_size,
            v13p.min_subgroup_size,
            v13p.max_subgroup_size,
            v13p.max_compute_workgroup_subgroups
        );
        println!(
            "  features: f16 {}, subgroups {}, subgroup size control {}, coop matrix {} ({} configs), int8 {}, int dot {}, zero-init workgroup mem {}, robustBufferAccess {}, robustBufferAccess2 {}, robust image access {}",
            caps.shader_f16,
            caps.subgroup,
            caps.subgroup_size_control,
            caps.coop_matrix,
            coop_props.len(),
            caps.shader_int8,
            caps.integer_dot_product,
            caps.zero_init_native,
            b(core.robust_buffer_access),
            caps.robust_buffer_access2,
            caps.robust_image_access,
        );
        if no_robust {
            println!("  --no-robust: robustness features NOT enabled (wgpu would enable them)");
        }
        for cp in &coop_props {
            println!(
                "  coop matrix: {}x{}x{} A {} B {} C {} R {} scope {:?}{}",
                cp.m_size,
                cp.n_size,
                cp.k_size,
                component(cp.a_type),
                component(cp.b_type),
                component(cp.c_type),
                component(cp.result_type),
                cp.scope,
                if b(cp.saturating_accumulation) {
                    " saturating"
                } else {
                    ""
                }
            );
        }

        // Queue: any family with compute.
        let qfs = unsafe { inst.get_physical_device_queue_family_properties(pd) };
        let family = qfs
            .iter()
            .position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or_else(|| anyhow!("device {chosen} ({name}) has no compute queue family"))?
            as u32;
        let prio = [1.0f32];
        let qci = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&prio)];

        // Re-chain the queried (possibly edited) structs for vkCreateDevice.
        let mut f2 = feats.chain(vk::PhysicalDeviceFeatures2::default().features(core), has);
        let dci = vk::DeviceCreateInfo::default()
            .queue_create_infos(&qci)
            .enabled_extension_names(&ext_names)
            .push_next(&mut f2);
        let device = unsafe { inst.create_device(pd, &dci, None) }.with_context(|| {
            format!("vkCreateDevice on {name} (all supported features enabled)")
        })?;
        let pep =
            has_pep.then(|| ash::khr::pipeline_executable_properties::Device::new(inst, &device));
        Ok(Gpu {
            device,
            pep,
            caps,
            _instance: instance,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// naga options, mirroring wgpu-hal 30.0.1

struct NagaOpts {
    /// `Device::naga_options` (adapter.rs 2668-2877) combined with the per-pipeline changes of
    /// `compile_stage` (device.rs 712-784); `binding_map` and `debug_info` are filled per entry.
    base: spv::Options<'static>,
    capabilities: Vec<spv::Capability>,
    notes: Vec<String>,
    varying_subgroup_size: bool,
}

impl NagaOpts {
    fn new(caps: &Caps, args: &Args, checked: bool) -> NagaOpts {
        use spv::Capability as C;
        let mut notes = Vec::new();
        // adapter.rs 2671-2824: always-available capabilities, then per enabled feature.
        let mut cap = vec![
            C::Shader,
            C::Matrix,
            C::Sampled1D,
            C::Image1D,
            C::ImageQuery,
            C::DerivativeControl,
            C::StorageImageExtendedFormats,
        ];
        if caps.image_cube_array {
            cap.push(C::SampledCubeArray); // DownlevelFlags::CUBE_ARRAY_TEXTURES
        }
        if caps.sample_rate_shading {
            cap.push(C::SampleRateShading); // DownlevelFlags::MULTISAMPLED_SHADING
        }
        if caps.subgroup {
            cap.extend([
                C::GroupNonUniform,
                C::GroupNonUniformVote,
                C::GroupNonUniformArithmetic,
                C::GroupNonUniformBallot,
                C::GroupNonUniformShuffle,
                C::GroupNonUniformShuffleRelative,
                C::GroupNonUniformQuad,
            ]);
        }
        if caps.shader_f16 {
            cap.push(C::Float16);
        }
        if caps.coop_matrix {
            cap.push(C::CooperativeMatrixKHR);
            cap.push(C::VulkanMemoryModel);
        }
        if caps.integer_dot_product {
            cap.extend([
                C::DotProductInputAllKHR,
                C::DotProductInput4x8BitKHR,
                C::DotProductInput4x8BitPackedKHR,
                C::DotProductKHR,
            ]);
        }
        if caps.shader_int8 {
            cap.push(C::Int8);
        }

        // adapter.rs 2773-2792
        let mut flags = spv::WriterFlags::empty();
        flags.set(spv::WriterFlags::DEBUG, args.debug);
        flags.set(spv::WriterFlags::LABEL_VARYINGS, caps.vendor_id != 0x5143); // Qualcomm
        flags.set(spv::WriterFlags::FORCE_POINT_SIZE, true);
        flags.set(
            spv::WriterFlags::PRINT_ON_RAY_QUERY_INITIALIZATION_FAIL
                | spv::WriterFlags::PRINT_ON_TRACE_RAYS_FAIL,
            args.debug, // instance API is 1.3
        );

        // adapter.rs 2827-2834
        let v = caps.api_version;
        let lang_version = if v >= vk::API_VERSION_1_3 {
            (1, 6)
        } else if v >= vk::API_VERSION_1_2 {
            (1, 5)
        } else if v >= vk::API_VERSION_1_1 {
            (1, 3)
        } else {
            (1, 0)
        };

        use naga::proc::BoundsCheckPolicy as P;
        let bounds_check_policies = if checked {
            // adapter.rs 2838-2852
            naga::proc::BoundsCheckPolicies {
                index: P::Restrict,
                buffer: if caps.robust_buffer_access2 {
                    P::Unchecked
                } else {
                    P::Restrict
                },
                image_load: if caps.robust_image_access {
                    P::Unchecked
                } else {
                    P::Restrict
                },
                binding_array: P::Unchecked,
            }
        } else {
            // device.rs 729-736 (!runtime_checks.bounds_checks)
            naga::proc::BoundsCheckPolicies {
                index: P::Unchecked,
                buffer: P::Unchecked,
                image_load: P::Unchecked,
                binding_array: P::Unchecked,
            }
        };

        // adapter.rs 2853-2860; device.rs 754-757 for `none`.
        let zero_initialize_workgroup_memory = match args.zero_init {
            ZeroInit::Native if caps.zero_init_native => {
                spv::ZeroInitializeWorkgroupMemoryMode::Native
            }
            ZeroInit::Native => {
                notes.push("device lacks shaderZeroInitializeWorkgroupMemory: zero-init falls back to Polyfill, as wgpu does".into());
                spv::ZeroInitializeWorkgroupMemoryMode::Polyfill
            }
            ZeroInit::Polyfill => spv::ZeroInitializeWorkgroupMemoryMode::Polyfill,
            ZeroInit::None => spv::ZeroInitializeWorkgroupMemoryMode::None,
        };

        let base = spv::Options {
            lang_version,
            flags,
            capabilities: Some(cap.iter().cloned().collect()),
            bounds_check_policies,
            zero_initialize_workgroup_memory,
            // adapter.rs 2861; device.rs 737-739 (false when unchecked)
            force_loop_bounding: checked,
            // adapter.rs 2862; device.rs 740-742
            ray_query_initialization_tracking: checked,
            // adapter.rs 2863-2864
            use_storage_input_output_16: caps.shader_f16 && caps.storage_input_output16,
            // adapter.rs 2865
            fake_missing_bindings: false,
            // device.rs 743-745 (filled per pipeline from the layout)
            binding_map: BTreeMap::default(),
            // device.rs 747-753 (with InstanceFlags::DEBUG only)
            debug_info: None,
            // adapter.rs 2869-2872; device.rs 758-760 (None when unchecked). Only task shaders
            // use it; wgpress requests no mesh-shader limits, so they are 0.
            task_dispatch_limits: checked.then_some(naga::back::TaskDispatchLimits {
                max_mesh_workgroups_per_dim: 0,
                max_mesh_workgroups_total: 0,
            }),
            // adapter.rs 2873; device.rs 761-762
            mesh_shader_primitive_indices_clamp: checked,
            // adapter.rs 2874
            trace_ray_argument_validation: true,
            // adapter.rs 2875; device.rs 763
            emit_int_div_checks: checked,
        };
        NagaOpts {
            base,
            capabilities: cap,
            notes,
            // device.rs 789-792: ALLOW_VARYING_SUBGROUP_SIZE when Features::SUBGROUP is on.
            varying_subgroup_size: caps.subgroup && caps.subgroup_size_control,
        }
    }

    fn print(&self, checked: bool) {
        let o = &self.base;
        println!(
            "naga 30.0.1 options ({}): SPIR-V {}.{}, flags {:?}, bounds {:?}/{:?}/{:?}/{:?} (index/buffer/image/binding-array), zero-init {:?}, force_loop_bounding {}, int_div_checks {}, storage_io16 {}",
            if checked {
                "checked: ShaderRuntimeChecks::checked()"
            } else {
                "unchecked: create_shader_module_trusted(.., ShaderRuntimeChecks::unchecked())"
            },
            o.lang_version.0,
            o.lang_version.1,
            o.flags,
            o.bounds_check_policies.index,
            o.bounds_check_policies.buffer,
            o.bounds_check_policies.image_load,
            o.bounds_check_policies.binding_array,
            o.zero_initialize_workgroup_memory,
            o.force_loop_bounding,
            o.emit_int_div_checks,
            o.use_storage_input_output_16,
        );
        println!(
            "  SPIR-V capabilities allowed: {:?}; stage flags: {}",
            self.capabilities,
            if self.varying_subgroup_size {
                "ALLOW_VARYING_SUBGROUP_SIZE"
            } else {
                "none"
            }
        );
        for n in &self.notes {
            println!("  note: {n}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// per entry point

/// Vulkan objects of one pipeline, destroyed in reverse order on drop (also on errors).
struct Objects<'a> {
    dev: &'a ash::Device,
    module: vk::ShaderModule,
    set_layouts: Vec<vk::DescriptorSetLayout>,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
}

impl Drop for Objects<'_> {
    fn drop(&mut self) {
        unsafe {
            if self.pipeline != vk::Pipeline::null() {
                self.dev.destroy_pipeline(self.pipeline, None);
            }
            if self.layout != vk::PipelineLayout::null() {
                self.dev.destroy_pipeline_layout(self.layout, None);
            }
            for &l in &self.set_layouts {
                self.dev.destroy_descriptor_set_layout(l, None);
            }
            if self.module != vk::ShaderModule::null() {
                self.dev.destroy_shader_module(self.module, None);
            }
        }
    }
}

struct Binding {
    group: u32,
    /// WGSL @binding.
    wgsl_binding: u32,
    /// Vulkan binding after wgpu-hal's compaction (device.rs ~1416-1458, 1611-1631): per group,
    /// the entries sorted by WGSL binding numbered 0, 1, 2, ...
    vk_binding: u32,
    ty: vk::DescriptorType,
    count: u32,
    array_size: Option<u32>,
    name: String,
}

fn descriptor_type(
    module: &naga::Module,
    var: &naga::GlobalVariable,
) -> Result<(vk::DescriptorType, Option<u32>)> {
    use naga::{AddressSpace as A, TypeInner as T};
    let mut ty = &module.types[var.ty].inner;
    let mut array_size = None;
    if let T::BindingArray { base, size } = *ty {
        array_size = match size {
            naga::ArraySize::Constant(n) => Some(n.get()),
            _ => bail!(
                "binding array {:?} without a constant size is not supported",
                var.name
            ),
        };
        ty = &module.types[base].inner;
    }
    let dt = match (var.space, ty) {
        (A::Uniform, _) => vk::DescriptorType::UNIFORM_BUFFER,
        (A::Storage { .. }, _) => vk::DescriptorType::STORAGE_BUFFER,
        (A::Handle, T::Sampler { .. }) => vk::DescriptorType::SAMPLER,
        (A::Handle, T::Image { class, .. }) => match class {
            naga::ImageClass::Storage { .. } => vk::DescriptorType::STORAGE_IMAGE,
            _ => vk::DescriptorType::SAMPLED_IMAGE,
        },
        (A::Handle, T::AccelerationStructure { .. }) => {
            vk::DescriptorType::ACCELERATION_STRUCTURE_KHR
        }
        (space, _) => bail!(
            "global {:?} in address space {space:?} has a binding; not supported",
            var.name
        ),
    };
    Ok((dt, array_size))
}

#[allow(clippy::too_many_arguments)]
fn process_entry(
    gpu: &Gpu,
    opts: &NagaOpts,
    args: &Args,
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    source: &str,
    entry: &str,
    constants: &naga::back::PipelineConstants,
) -> Result<()> {
    let dev = &gpu.device;
    let stage = naga::ShaderStage::Compute;

    // device.rs 770-778: process_overrides (also compacts the module down to this entry point).
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        module,
        info,
        Some((stage, entry)),
        constants,
    )
    .context("naga::back::pipeline_constants::process_overrides")?;
    let ep_index = module
        .entry_points
        .iter()
        .position(|ep| ep.stage == stage && ep.name == entry)
        .ok_or_else(|| anyhow!("entry point vanished after process_overrides"))?;
    let ep = &module.entry_points[ep_index];
    let ep_info = info.get_entry_point(ep_index);

    // Globals used by this entry point: bindings (wgpu's derived layout, `layout: None`) and
    // workgroup memory as naga lays it out.
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| anyhow!("naga layouter: {e}"))?;
    let mut bindings: Vec<Binding> = Vec::new();
    let mut wg_bytes = 0u64;
    let mut wg_vars = Vec::new();
    let mut push_constant_size = 0u32;
    for (h, var) in module.global_variables.iter() {
        if ep_info[h].is_empty() {
            continue;
        }
        let name = var
            .name
            .clone()
            .unwrap_or_else(|| format!("global#{}", h.index()));
        match var.space {
            naga::AddressSpace::WorkGroup => {
                let size = layouter[var.ty].size as u64;
                wg_bytes += size;
                wg_vars.push(format!("{name} {size} B"));
            }
            naga::AddressSpace::Immediate => {
                push_constant_size = push_constant_size.max(layouter[var.ty].size);
            }
            _ => {}
        }
        if let Some(rb) = var.binding {
            let (ty, array_size) =
                descriptor_type(&module, var).with_context(|| format!("binding of {name}"))?;
            bindings.push(Binding {
                group: rb.group,
                wgsl_binding: rb.binding,
                vk_binding: 0,
                ty,
                count: array_size.unwrap_or(1),
                array_size,
                name,
            });
        }
    }
    bindings.sort_by_key(|b| (b.group, b.wgsl_binding));
    let mut next: BTreeMap<u32, u32> = BTreeMap::new();
    for bnd in &mut bindings {
        let n = next.entry(bnd.group).or_insert(0);
        bnd.vk_binding = *n;
        *n += 1;
    }

    let [x, y, z] = ep.workgroup_size;
    println!(
        "naga: workgroup size {x}x{y}x{z} = {} invocations; workgroup memory {wg_bytes} B{}",
        x * y * z,
        if wg_vars.is_empty() {
            String::new()
        } else {
            format!(" ({})", wg_vars.join(", "))
        }
    );
    for bnd in &bindings {
        println!(
            "  @group({}) @binding({}) {} -> set {} binding {} {:?}{}",
            bnd.group,
            bnd.wgsl_binding,
            bnd.name,
            bnd.group,
            bnd.vk_binding,
            bnd.ty,
            bnd.array_size.map(|n| format!(" x{n}")).unwrap_or_default()
        );
    }

    // naga options for this pipeline.
    let mut options = opts.base.clone();
    options.binding_map = bindings
        .iter()
        .map(|bnd| {
            (
                naga::ResourceBinding {
                    group: bnd.group,
                    binding: bnd.wgsl_binding,
                },
                spv::BindingInfo {
                    descriptor_set: bnd.group,
                    binding: bnd.vk_binding,
                    binding_array_size: bnd.array_size,
                },
            )
        })
        .collect();
    let file_name = args.file.display().to_string();
    if args.debug {
        options.debug_info = Some(spv::DebugInfo {
            source_code: source,
            file_name: &file_name,
            language: spv::SourceLanguage::WGSL,
        });
    }
    let pipeline_options = spv::PipelineOptions {
        entry_point: entry.to_string(),
        shader_stage: stage,
    };
    let words = spv::write_vec(&module, &info, &options, Some(&pipeline_options))
        .context("naga::back::spv::write_vec")?;
    println!("SPIR-V: {} bytes ({} words)", words.len() * 4, words.len());
    if let Some(dir) = &args.spv_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = dir.join(format!("{}.spv", sanitize(entry)));
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        println!("  wrote {}", p.display());
    }

    // Vulkan objects.
    let mut objs = Objects {
        dev,
        module: vk::ShaderModule::null(),
        set_layouts: Vec::new(),
        layout: vk::PipelineLayout::null(),
        pipeline: vk::Pipeline::null(),
    };
    objs.module = unsafe {
        dev.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)
    }
    .context("vkCreateShaderModule")?;

    let max_group = bindings.iter().map(|b| b.group).max();
    if let Some(max_group) = max_group {
        for g in 0..=max_group {
            let vk_bindings: Vec<vk::DescriptorSetLayoutBinding> = bindings
                .iter()
                .filter(|b| b.group == g)
                .map(|b| {
                    vk::DescriptorSetLayoutBinding::default()
                        .binding(b.vk_binding)
                        .descriptor_type(b.ty)
                        .descriptor_count(b.count)
                        .stage_flags(vk::ShaderStageFlags::COMPUTE)
                })
                .collect();
            let l = unsafe {
                dev.create_descriptor_set_layout(
                    &vk::DescriptorSetLayoutCreateInfo::default().bindings(&vk_bindings),
                    None,
                )
            }
            .with_context(|| format!("vkCreateDescriptorSetLayout (set {g})"))?;
            objs.set_layouts.push(l);
        }
    }
    let pc = [vk::PushConstantRange::default()
        .stage_flags(vk::ShaderStageFlags::COMPUTE)
        .size(push_constant_size)];
    let mut plci = vk::PipelineLayoutCreateInfo::default().set_layouts(&objs.set_layouts);
    if push_constant_size > 0 {
        plci = plci.push_constant_ranges(&pc);
    }
    objs.layout =
        unsafe { dev.create_pipeline_layout(&plci, None) }.context("vkCreatePipelineLayout")?;

    let entry_c = std::ffi::CString::new(entry).context("entry point name")?;
    let mut stage_flags = vk::PipelineShaderStageCreateFlags::empty();
    if opts.varying_subgroup_size {
        stage_flags |= vk::PipelineShaderStageCreateFlags::ALLOW_VARYING_SUBGROUP_SIZE;
    }
    let stage_info = vk::PipelineShaderStageCreateInfo::default()
        .flags(stage_flags)
        .stage(vk::ShaderStageFlags::COMPUTE)
        .module(objs.module)
        .name(&entry_c);
    let mut pflags = vk::PipelineCreateFlags::empty();
    if gpu.pep.is_some() {
        pflags |= vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR;
    }
    if gpu.pep.is_some() && args.ir_dir.is_some() {
        pflags |= vk::PipelineCreateFlags::CAPTURE_INTERNAL_REPRESENTATIONS_KHR;
    }
    let cpci = [vk::ComputePipelineCreateInfo::default()
        .flags(pflags)
        .stage(stage_info)
        .layout(objs.layout)];
    let t0 = std::time::Instant::now();
    let pipelines = unsafe { dev.create_compute_pipelines(vk::PipelineCache::null(), &cpci, None) }
        .map_err(|(ps, e)| {
            for p in ps {
                if p != vk::Pipeline::null() {
                    unsafe { dev.destroy_pipeline(p, None) };
                }
            }
            e
        })
        .context("vkCreateComputePipelines")?;
    objs.pipeline = pipelines[0];
    println!(
        "pipeline created in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );

    // Executables and statistics.
    let Some(pep) = &gpu.pep else {
        bail!(
            "no statistics: the driver does not support VK_KHR_pipeline_executable_properties \
             (SPIR-V compilation, layout and vkCreateComputePipelines succeeded)"
        );
    };
    let pinfo = vk::PipelineInfoKHR::default().pipeline(objs.pipeline);
    let execs = unsafe { pep.get_pipeline_executable_properties(&pinfo) }
        .context("vkGetPipelineExecutablePropertiesKHR")?;
    if execs.is_empty() {
        println!("the driver reports no pipeline executables");
    }
    for (i, ex) in execs.iter().enumerate() {
        println!(
            "executable {i}: {} — {} (stages {:?}, subgroup size {})",
            c_str(&ex.name),
            c_str(&ex.description),
            ex.stages,
            ex.subgroup_size
        );
        let einfo = vk::PipelineExecutableInfoKHR::default()
            .pipeline(objs.pipeline)
            .executable_index(i as u32);
        let stats = unsafe { pep.get_pipeline_executable_statistics(&einfo) }
            .with_context(|| format!("vkGetPipelineExecutableStatisticsKHR (executable {i})"))?;
        let rows: Vec<(String, String, String)> = stats
            .iter()
            .map(|s| {
                let v = unsafe {
                    match s.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => {
                            (s.value.b32 != vk::FALSE).to_string()
                        }
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64.to_string(),
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => {
                            let v = s.value.u64;
                            if v >> 32 != 0 {
                                // Implausible for a size or count. NVIDIA 580 reports "Local
                                // Memory Size" this way: the real value in the low 32 bits
                                // (a 2 KiB per-thread array reads 0x10_0000_0800).
                                format!(
                                    "{} [low 32 bits; raw u64 {v:#x} = {v}, high word {}]",
                                    v as u32,
                                    v >> 32
                                )
                            } else {
                                v.to_string()
                            }
                        }
                        vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => {
                            format!("{}", s.value.f64)
                        }
                        f => format!("<unknown format {f:?}>"),
                    }
                };
                (c_str(&s.name), v, c_str(&s.description))
            })
            .collect();
        let w = rows
            .iter()
            .map(|r| r.0.len() + r.1.len())
            .max()
            .unwrap_or(0)
            + 3;
        for (name, v, desc) in &rows {
            let lhs = format!("{name} = {v}");
            println!("    {lhs:<w$}  # {desc}");
        }
        if stats.is_empty() {
            println!("    (no statistics)");
        }
        if let Some(dir) = &args.ir_dir {
            dump_ir(pep, &einfo, dir, entry, i)
                .with_context(|| format!("internal representations of executable {i}"))?;
        }
    }
    Ok(())
}

fn sanitize(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

fn dump_ir(
    pep: &ash::khr::pipeline_executable_properties::Device,
    einfo: &vk::PipelineExecutableInfoKHR,
    dir: &Path,
    entry: &str,
    exec: usize,
) -> Result<()> {
    // Call 1+2 (ash): the count, then the entries with `p_data` NULL, which returns each
    // `data_size`. Call 3: the data itself.
    let mut reps = unsafe { pep.get_pipeline_executable_internal_representations(einfo) }
        .context("vkGetPipelineExecutableInternalRepresentationsKHR (sizes)")?;
    if reps.is_empty() {
        println!("    (no internal representations)");
        return Ok(());
    }
    let mut bufs: Vec<Vec<u8>> = reps.iter().map(|r| vec![0u8; r.data_size]).collect();
    for (r, buf) in reps.iter_mut().zip(bufs.iter_mut()) {
        r.p_data = buf.as_mut_ptr().cast();
    }
    let mut count = reps.len() as u32;
    let res = unsafe {
        (pep.fp()
            .get_pipeline_executable_internal_representations_khr)(
            pep.device(),
            einfo,
            &mut count,
            reps.as_mut_ptr(),
        )
    };
    match res {
        vk::Result::SUCCESS => {}
        vk::Result::INCOMPLETE => {
            println!("    warning: internal representations truncated (VK_INCOMPLETE)")
        }
        e => {
            return Err(anyhow!("{e}"))
                .context("vkGetPipelineExecutableInternalRepresentationsKHR (data)");
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut listing = String::new();
    for (r, buf) in reps.iter().take(count as usize).zip(bufs.iter_mut()) {
        let name = c_str(&r.name);
        let text = b(r.is_text);
        let mut data = &buf[..r.data_size.min(buf.len())];
        if text {
            while let [rest @ .., 0] = data {
                data = rest;
            }
        }
        let p = dir.join(format!(
            "{}.{exec}.{}.{}",
            sanitize(entry),
            sanitize(&name),
            if text { "txt" } else { "bin" }
        ));
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
        let _ = writeln!(
            listing,
            "    IR {name:?} ({}): {} bytes -> {}",
            c_str(&r.description),
            data.len(),
            p.display()
        );
    }
    print!("{listing}");
    Ok(())
}
