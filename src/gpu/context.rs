//! The one GPU context: adapter choice, device with negotiated limits and features, the pipeline
//! cache, the live-buffer memory tracker and the translation of wgpu failures into [`Error`]s.
//! Kernel families (matmul, reduce, quant, ...) live in sibling files and only borrow this context;
//! nothing outside `gpu/` touches wgpu.

use super::profile::{self, Profile};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Environment variable read when no `--adapter` is given (same syntax: name substring or index).
pub const ADAPTER_ENV: &str = "WGPRESS_ADAPTER";

/// A directory (read by the binary into [`ContextOptions::dump_shaders`]): every shader module the
/// context builds is also written there as the exact WGSL handed to wgpu (host constants
/// included), named after its pipeline key and entry point, so a driver-side tool (tools/vkstats:
/// registers, spills, shared memory per kernel) sees what ran.
pub const DUMP_SHADERS_ENV: &str = "WGPRESS_DUMP_SHADERS";

/// What the caller asks of the context.
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Adapter selector: an index into [`list_adapters`] or a case-insensitive name substring.
    pub adapter: Option<String>,
    /// Override the storage binding limit (bytes) below the adapter's, so tests exercise chunking.
    pub binding_limit: Option<u64>,
    /// Build every shader with wgpu's runtime bounds checks on (tests run this way too).
    pub checked_shaders: bool,
    /// Leave out the optional fast-path features (f16, subgroups, cooperative matrices).
    pub no_fast_paths: bool,
    /// Also write every shader module built to this directory ([`DUMP_SHADERS_ENV`]).
    pub dump_shaders: Option<std::path::PathBuf>,
}

/// One adapter as found on this machine.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {} ({}, {}{})",
            self.index,
            self.name,
            self.device_type,
            self.backend,
            if self.driver.is_empty() {
                String::new()
            } else {
                format!(", {}", self.driver)
            }
        )
    }
}

fn new_instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    })
}

fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    AdapterSummary {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
    }
}

fn enumerate(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
}

/// All adapters wgpu can see, in the order `--adapter INDEX` refers to.
pub fn list_adapters() -> Vec<AdapterSummary> {
    enumerate(&new_instance())
        .iter()
        .enumerate()
        .map(|(i, a)| summarize(i, a))
        .collect()
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn choose(adapters: &[wgpu::Adapter], selector: Option<&str>) -> Result<usize> {
    if adapters.is_empty() {
        return Err(Error::NoAdapter(
            "wgpu found no adapter (no Vulkan/Metal/DX12 driver; on Linux install mesa-vulkan-drivers for the lavapipe software adapter)".into(),
        ));
    }
    if let Some(sel) = selector {
        if let Ok(i) = sel.parse::<usize>() {
            return if i < adapters.len() {
                Ok(i)
            } else {
                Err(Error::NoAdapter(format!(
                    "adapter index {i} out of range ({} adapters found)",
                    adapters.len()
                )))
            };
        }
        let needle = sel.to_lowercase();
        return adapters
            .iter()
            .position(|a| a.get_info().name.to_lowercase().contains(&needle))
            .ok_or_else(|| {
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                Error::NoAdapter(format!(
                    "no adapter name contains `{sel}` (found: {})",
                    names.join(", ")
                ))
            });
    }
    Ok((0..adapters.len())
        .min_by_key(|&i| (rank(adapters[i].get_info().device_type), i))
        .unwrap_or(0))
}

/// Capabilities negotiated with the device, read by kernel wrappers to pick their path.
#[derive(Clone, Debug)]
pub struct Capabilities {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    /// 16x16x16 cooperative matrices with f16 inputs and f32 accumulation.
    pub coop_f16_16x16: bool,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    /// Smallest and largest subgroup size the adapter may use.
    pub subgroup_size: (u32, u32),
}

/// The GPU context. Cheap to share by reference; all kernel wrappers take `&GpuContext`.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    pub software: bool,
    pub caps: Capabilities,
    pub(crate) limits: wgpu::Limits,
    binding_limit: u64,
    pub(crate) checked: bool,
    dump_shaders: Option<std::path::PathBuf>,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// The cooperative matmul's tile tuning books (`gpu::tune`), made at first use.
    pub(crate) tuner: Mutex<Option<super::tune::Tuner>>,
    /// Tensor buffers: reuse and live/peak accounting (`gpu::pool`).
    pub(crate) pool: Arc<super::pool::BufferPool>,
    lost: Arc<AtomicBool>,
    uncaptured: Arc<Mutex<Option<String>>>,
    /// `Some` while `--profile` timing is on.
    profile: Mutex<Option<Profile>>,
    /// Kernel family of each cached pipeline (by address), for the profile.
    pipeline_names: Mutex<HashMap<usize, String>>,
    /// The read-back staging buffer, reused: mapping a freshly allocated buffer per read-back
    /// pins new host memory every time, which made large read-backs run at ~0.5 GB/s.
    staging: Mutex<Option<wgpu::Buffer>>,
}

/// `dst.copy_from_slice(src)` on several threads for large copies: a fresh destination costs a
/// page fault per 4 KiB page, which dominated large read-backs on one thread (~1.4 GB/s).
fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    // Pieces of at least 4 MiB: smaller copies stay on the calling thread.
    const MIN_PER_THREAD: usize = 4 << 20;
    let piece = MIN_PER_THREAD.max(dst.len().div_ceil(crate::par::threads()));
    crate::par::for_chunks_mut(dst, piece, |start, d| {
        d.copy_from_slice(&src[start..start + d.len()])
    });
}

/// Largest read-back piece: large reads go through the cached staging buffer in pieces of at most
/// this size (and at most a quarter of the binding limit, so tests with a lowered limit read
/// chunks in several pieces), so host memory for staging stays bounded whatever the tensor size.
pub const READBACK_PIECE: u64 = 64 << 20;

impl GpuContext {
    pub fn new(opts: &ContextOptions) -> Result<Self> {
        let instance = new_instance();
        let adapters = enumerate(&instance);
        let env_sel = std::env::var(ADAPTER_ENV).ok();
        let sel = opts.adapter.as_deref().or(env_sel.as_deref());
        let idx = choose(&adapters, sel)?;
        let adapter = &adapters[idx];
        let summary = summarize(idx, adapter);
        let info = adapter.get_info();
        let software = info.device_type == wgpu::DeviceType::Cpu;
        if software {
            log::warn!(
                "using the software adapter {} (no hardware GPU found or selected): correct but slow",
                summary
            );
        } else {
            log::info!("using adapter {summary}");
        }
        let af = adapter.features();
        let mut want = wgpu::Features::empty();
        if !opts.no_fast_paths {
            for f in [
                wgpu::Features::SHADER_F16,
                wgpu::Features::SUBGROUP,
                wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
            ] {
                if af.contains(f) {
                    want |= f;
                }
            }
        }
        if af.contains(wgpu::Features::TIMESTAMP_QUERY) {
            want |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let coop_f16_16x16 = want.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && adapter.cooperative_matrix_properties().iter().any(|p| {
                p.m_size == 16
                    && p.n_size == 16
                    && p.k_size == 16
                    && p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
            });
        if !coop_f16_16x16 {
            want.remove(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        }
        let limits = adapter.limits();
        let experimental = if want.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: cooperative matrices are an experimental wgpu feature; we only use them in
            // kernels that tests compare against the f32 reference on the adapter that offers them.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgpress"),
            required_features: want,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::NoAdapter(format!("{summary}: request_device failed: {e}")))?;
        let lost = Arc::new(AtomicBool::new(false));
        {
            let lost = lost.clone();
            device.set_device_lost_callback(move |reason, msg| {
                log::error!("GPU device lost ({reason:?}): {msg}");
                lost.store(true, Ordering::SeqCst);
            });
        }
        let uncaptured = Arc::new(Mutex::new(None));
        {
            let slot = uncaptured.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                log::error!("uncaptured GPU error: {e}");
                if let Ok(mut s) = slot.lock() {
                    s.get_or_insert_with(|| e.to_string());
                }
            }));
        }
        let adapter_binding =
            (limits.max_storage_buffer_binding_size as u64).min(limits.max_buffer_size);
        let binding_limit = opts
            .binding_limit
            .map(|b| b.min(adapter_binding))
            .unwrap_or(adapter_binding);
        let f = device.features();
        Ok(GpuContext {
            caps: Capabilities {
                shader_f16: f.contains(wgpu::Features::SHADER_F16),
                subgroups: f.contains(wgpu::Features::SUBGROUP),
                timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
                coop_f16_16x16,
                max_workgroup_storage: limits.max_compute_workgroup_storage_size,
                max_invocations: limits.max_compute_invocations_per_workgroup,
                subgroup_size: (info.subgroup_min_size, info.subgroup_max_size),
            },
            device,
            queue,
            adapter: summary,
            software,
            limits,
            binding_limit,
            checked: opts.checked_shaders,
            dump_shaders: opts.dump_shaders.clone(),
            pipelines: Mutex::new(HashMap::new()),
            tuner: Mutex::new(None),
            pool: Arc::new(super::pool::BufferPool::from_env()),
            lost,
            uncaptured,
            profile: Mutex::new(None),
            pipeline_names: Mutex::new(HashMap::new()),
            staging: Mutex::new(None),
        })
    }

    /// Starts timing every dispatch by kernel family (timestamp queries; see `gpu::profile`).
    /// An error on adapters without timestamp queries.
    pub fn start_profiling(&self) -> Result<()> {
        if !self.caps.timestamps {
            return Err(Error::gpu(
                "profile",
                "-",
                format!(
                    "adapter {} offers no timestamp queries, which --profile needs",
                    self.adapter
                ),
            ));
        }
        *self.profile.lock().map_err(poisoned)? = Some(Profile::default());
        Ok(())
    }

    /// The GPU time of the dispatches `f` records, from timestamp queries: each dispatch in its
    /// own pass, so no submission, wait or host gap is counted (the tile tuner's trials; it does
    /// not make a GPU that has just idled run at full clock: BENCHMARKS.md, session 13).
    /// Adapters without timestamp queries: the wall-clock time from an idle GPU to the end of
    /// the work. Under `--profile` the dispatches are counted in the profile as well.
    pub(crate) fn gpu_seconds(
        &self,
        kernel: &str,
        shape: &str,
        f: impl FnOnce() -> Result<()>,
    ) -> Result<f64> {
        if !self.caps.timestamps {
            self.sync(kernel, shape)?;
            let t = std::time::Instant::now();
            f()?;
            self.sync(kernel, shape)?;
            return Ok(t.elapsed().as_secs_f64());
        }
        let outer = self
            .profile
            .lock()
            .map_err(poisoned)?
            .replace(Profile::default());
        let result = f();
        let mut guard = self.profile.lock().map_err(poisoned)?;
        let mine = std::mem::replace(&mut *guard, outer).unwrap_or_default();
        if let Some(o) = guard.as_mut() {
            o.merge(&mine);
        }
        drop(guard);
        result?;
        Ok(mine.total_seconds())
    }

    /// Declares the work (FLOPs, bytes) of a dispatch of `pipeline` for the profile's rates; a
    /// no-op unless profiling is on. Wrappers call it for each dispatch they record.
    pub(crate) fn add_work(&self, pipeline: &wgpu::ComputePipeline, flops: f64, bytes: f64) {
        let Ok(mut guard) = self.profile.lock() else {
            return;
        };
        let Some(prof) = guard.as_mut() else {
            return;
        };
        let addr = pipeline as *const wgpu::ComputePipeline as usize;
        if let Ok(names) = self.pipeline_names.lock()
            && let Some(name) = names.get(&addr)
        {
            prof.add_work(name, flops, bytes);
        }
    }

    /// Stops timing and returns what was measured since `start_profiling` (None if it was off).
    pub fn take_profile(&self) -> Result<Option<Profile>> {
        Ok(self.profile.lock().map_err(poisoned)?.take())
    }

    /// Largest byte size of one storage binding (and so of one buffer chunk).
    pub fn binding_limit(&self) -> u64 {
        self.binding_limit
    }

    /// Bytes of live tensors allocated through this context, and the high-water mark of live
    /// tensors plus buffers held for reuse (`gpu::pool`): the tensor memory really allocated.
    pub fn memory(&self) -> (u64, u64) {
        self.pool.memory()
    }

    /// Starts a new high-water mark from what is allocated now.
    pub fn reset_peak(&self) {
        self.pool.reset_peak()
    }

    /// Tensor buffer reuse counters (`gpu::pool`).
    pub fn pool_stats(&self) -> super::pool::PoolStats {
        self.pool.stats()
    }

    pub fn max_workgroups_per_dim(&self) -> u32 {
        self.limits.max_compute_workgroups_per_dimension
    }

    /// A cached compute pipeline for `entry` of the WGSL `source`, with `key` naming the variant.
    /// `trusted` kernels are built without runtime bounds checks unless the context asks for them;
    /// their wrappers must validate every shape and offset on the host first.
    pub(crate) fn pipeline(
        &self,
        key: &str,
        source: &str,
        entry: &str,
        trusted: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipeline_from(key, entry, trusted, || Ok(source.to_string()))
    }

    /// [`GpuContext::pipeline`] for a generated source, made only when `key` misses the cache
    /// (a matmul variant's source is composed from several pieces; not on every product).
    pub(crate) fn pipeline_from(
        &self,
        key: &str,
        entry: &str,
        trusted: bool,
        make: impl FnOnce() -> Result<String>,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let unchecked = trusted && !self.checked;
        let full_key = format!("{key}/{entry}/{unchecked}");
        if let Some(p) = self.pipelines.lock().map_err(poisoned)?.get(&full_key) {
            return Ok(p.clone());
        }
        let source = make()?;
        if let Some(dir) = &self.dump_shaders {
            dump_shader(dir, &full_key, &source);
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(key),
            source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
        };
        let module = if unchecked {
            // SAFETY: the kernel wrappers that mark a pipeline trusted check every shape, stride and
            // offset on the host before dispatch, and the test suite runs the same kernels checked.
            unsafe {
                self.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            self.device.create_shader_module(desc)
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::gpu(
                key,
                "-",
                format!("pipeline creation failed: {e}"),
            ));
        }
        let p = Arc::new(pipeline);
        self.pipeline_names
            .lock()
            .map_err(poisoned)?
            .insert(Arc::as_ptr(&p) as usize, format!("{key}/{entry}"));
        self.pipelines
            .lock()
            .map_err(poisoned)?
            .insert(full_key, p.clone());
        Ok(p)
    }

    /// Records compute dispatches of one kernel into a fresh encoder and submits them. Each dispatch
    /// is (bind group buffers in binding order, uniform bytes or none, workgroup counts); the
    /// uniform, when present, is bound after the storage buffers. Validation and out-of-memory
    /// errors come back as [`Error::Gpu`] naming `kernel` and `shape`.
    pub(crate) fn run(
        &self,
        kernel: &str,
        shape: &str,
        pipeline: &wgpu::ComputePipeline,
        dispatches: &[Dispatch<'_>],
    ) -> Result<()> {
        let steps: Vec<(&wgpu::ComputePipeline, &Dispatch)> =
            dispatches.iter().map(|d| (pipeline, d)).collect();
        self.run_steps(kernel, shape, &steps)
    }

    /// Like [`GpuContext::run`] for a sequence of dispatches of different kernels, recorded into
    /// one compute pass and one submission (each dispatch sees the writes of the earlier ones), so
    /// algorithms made of hundreds of small steps (blocked Cholesky, GPTQ) pay one submission.
    pub(crate) fn run_steps(
        &self,
        kernel: &str,
        shape: &str,
        steps: &[(&wgpu::ComputePipeline, &Dispatch<'_>)],
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        // All uniforms of the submission share one buffer (a slot per dispatch at the adapter's
        // offset alignment): creating a buffer per dispatch costs more than a small kernel when
        // an algorithm records hundreds of steps.
        let align = self.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let mut slots = Vec::with_capacity(steps.len());
        let mut arena: Vec<u8> = Vec::new();
        for (_, d) in steps {
            slots.push(d.uniform.map(|bytes| {
                let off = arena.len().div_ceil(align) * align;
                arena.resize(off, 0);
                arena.extend_from_slice(bytes);
                (off as u64, bytes.len() as u64)
            }));
        }
        let ubuf = (!arena.is_empty()).then(|| {
            use wgpu::util::DeviceExt;
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("uniforms"),
                    contents: &arena,
                    usage: wgpu::BufferUsages::UNIFORM,
                })
        });
        let mut groups = Vec::with_capacity(steps.len());
        for ((pipeline, d), slot) in steps.iter().zip(&slots) {
            let layout = pipeline.get_bind_group_layout(0);
            let mut entries: Vec<wgpu::BindGroupEntry> = d
                .buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: b.as_entire_binding(),
                })
                .collect();
            if let (Some((off, len)), Some(u)) = (slot, &ubuf) {
                entries.push(wgpu::BindGroupEntry {
                    binding: d.buffers.len() as u32,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: u,
                        offset: *off,
                        size: std::num::NonZeroU64::new(*len),
                    }),
                });
            }
            groups.push(self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel),
                layout: &layout,
                entries: &entries,
            }));
        }
        let mut profile = self.profile.lock().map_err(poisoned)?;
        if let Some(prof) = profile.as_mut() {
            self.record_timed(kernel, steps, &groups, prof)?;
        } else {
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some(kernel),
                });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(kernel),
                    timestamp_writes: None,
                });
                for ((pipeline, d), g) in steps.iter().zip(&groups) {
                    pass.set_pipeline(pipeline);
                    pass.set_bind_group(0, g, &[]);
                    pass.dispatch_workgroups(d.groups.0, d.groups.1, d.groups.2);
                }
            }
            self.queue.submit([enc.finish()]);
        }
        drop(profile);
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        if steps.len() > 16 {
            log::debug!(
                "{kernel} {shape}: {} dispatches recorded and submitted in {:.2} ms (host)",
                steps.len(),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        if let Some(e) = v.or(o) {
            return Err(Error::gpu(kernel, shape, e.to_string()));
        }
        self.check_health(kernel, shape)
    }

    /// Profiling: each dispatch in its own pass between two timestamps, submitted in batches of
    /// `profile::MAX_TIMED`, each batch waited for and its times added to `prof` by family.
    fn record_timed(
        &self,
        kernel: &str,
        steps: &[(&wgpu::ComputePipeline, &Dispatch<'_>)],
        groups: &[wgpu::BindGroup],
        prof: &mut Profile,
    ) -> Result<()> {
        let period = self.queue.get_timestamp_period();
        let names = self.pipeline_names.lock().map_err(poisoned)?.clone();
        for (w, window) in steps.chunks(profile::MAX_TIMED).enumerate() {
            let n = window.len();
            let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: (2 * n) as u32,
            });
            let bytes = (16 * n) as u64;
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some(kernel),
                });
            let mut families = Vec::with_capacity(n);
            for (i, (pipeline, d)) in window.iter().enumerate() {
                let g = &groups[w * profile::MAX_TIMED + i];
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(kernel),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &qs,
                        beginning_of_pass_write_index: Some((2 * i) as u32),
                        end_of_pass_write_index: Some((2 * i + 1) as u32),
                    }),
                });
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, g, &[]);
                pass.dispatch_workgroups(d.groups.0, d.groups.1, d.groups.2);
                let addr = *pipeline as *const wgpu::ComputePipeline as usize;
                families.push(
                    names
                        .get(&addr)
                        .cloned()
                        .unwrap_or_else(|| kernel.to_string()),
                );
            }
            enc.resolve_query_set(&qs, 0..(2 * n) as u32, &resolve, 0);
            self.queue.submit([enc.finish()]);
            let mut raw = vec![0u8; bytes as usize];
            self.read_buffer(&resolve, 0, &mut raw, kernel)?;
            profile::collect(&raw, n, period, &families, prof)?;
        }
        Ok(())
    }

    /// Waits for all submitted work; turns a lost device or an uncaptured error into an `Error`.
    pub fn sync(&self, kernel: &str, shape: &str) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::gpu(kernel, shape, format!("waiting for the GPU failed: {e}")))?;
        self.check_health(kernel, shape)
    }

    /// Fills `out` with the bytes of `buf` from byte `offset` (a multiple of 4; the end rounded
    /// up to 4 must lie inside `buf`), through the cached staging buffer, in pieces of at most
    /// [`READBACK_PIECE`] bytes.
    pub(crate) fn read_buffer(
        &self,
        buf: &wgpu::Buffer,
        offset: u64,
        out: &mut [u8],
        shape: &str,
    ) -> Result<()> {
        let len = out.len();
        let mut staging = self.staging.lock().map_err(poisoned)?;
        let piece = (READBACK_PIECE.min(self.binding_limit / 4) / 4 * 4)
            .min((len as u64).div_ceil(4) * 4)
            .max(4);
        if staging.as_ref().is_none_or(|s| s.size() < piece) {
            // Grown to the largest piece seen so far (never past READBACK_PIECE), then reused.
            *staging = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback staging"),
                size: piece,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let Some(st) = staging.as_ref() else {
            return Err(Error::gpu("readback", shape, "no staging buffer"));
        };
        let (t0, mut wait_s) = (std::time::Instant::now(), 0.0);
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(st.size() as usize);
            let copy = (n as u64).div_ceil(4) * 4;
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("readback"),
                });
            enc.copy_buffer_to_buffer(buf, offset + done as u64, st, 0, copy);
            self.queue.submit([enc.finish()]);
            let slice = st.slice(..copy);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            let tw = std::time::Instant::now();
            self.sync("readback", shape)?;
            wait_s += tw.elapsed().as_secs_f64();
            rx.recv()
                .map_err(|_| Error::gpu("readback", shape, "map callback never ran"))?
                .map_err(|e| Error::gpu("readback", shape, format!("buffer map failed: {e}")))?;
            {
                let data = slice
                    .get_mapped_range()
                    .map_err(|e| Error::gpu("readback", shape, format!("mapped range: {e}")))?;
                parallel_copy(&mut out[done..done + n], &data[..n]);
            }
            st.unmap();
            done += n;
        }
        if len >= 16 << 20 {
            let total = t0.elapsed().as_secs_f64();
            log::debug!(
                "readback {shape}: {} MiB in {:.1} ms ({:.1} ms waiting for copy and map, {:.1} ms host copy)",
                len >> 20,
                total * 1e3,
                wait_s * 1e3,
                (total - wait_s) * 1e3
            );
        }
        Ok(())
    }

    fn check_health(&self, kernel: &str, shape: &str) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::gpu(kernel, shape, "device lost"));
        }
        if let Some(e) = self.uncaptured.lock().map_err(poisoned)?.take() {
            return Err(Error::gpu(kernel, shape, e));
        }
        Ok(())
    }
}

/// One dispatch of a kernel: its storage buffers (binding 0..n), optional uniform (binding n) and
/// workgroup counts.
pub(crate) struct Dispatch<'a> {
    pub buffers: Vec<&'a wgpu::Buffer>,
    pub uniform: Option<&'a [u8]>,
    pub groups: (u32, u32, u32),
}

/// Writes `source` to `dir` ([`ContextOptions::dump_shaders`]). A diagnostic: a failure to write
/// is logged, never an error of the run.
fn dump_shader(dir: &std::path::Path, full_key: &str, source: &str) {
    let name: String = full_key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{name}.wgsl"));
    let text = format!("// wgpress pipeline {full_key} (key/entry/unchecked)\n{source}");
    if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, text)) {
        log::warn!("{DUMP_SHADERS_ENV}: cannot write {}: {e}", path.display());
    }
}

pub(crate) fn poisoned<T>(_: std::sync::PoisonError<T>) -> Error {
    Error::gpu("context", "-", "internal lock poisoned by an earlier panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> GpuContext {
        GpuContext::new(&ContextOptions {
            checked_shaders: true,
            ..Default::default()
        })
        .expect("no GPU adapter: install mesa-vulkan-drivers (lavapipe) to run the GPU tests")
    }

    #[test]
    fn a_shader_error_becomes_an_error_naming_the_kernel() {
        let ctx = ctx();
        let bad = "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }";
        let e = ctx
            .pipeline("broken_kernel", bad, "main", false)
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("broken_kernel"), "{msg}");
    }

    #[test]
    fn gpu_seconds_times_the_dispatches_and_keeps_an_outer_profile() {
        let ctx = ctx();
        let src = "@group(0) @binding(0) var<storage, read_write> o: array<u32>;\n@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) { var x = g.x; for (var i = 0u; i < 2000u; i++) { x = x * 1664525u + 1013904223u; } o[g.x] = x; }";
        let pipe = ctx.pipeline("spin", src, "main", false).unwrap();
        let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4 * 64 * 64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let run = || {
            let d = Dispatch {
                buffers: vec![&buf],
                uniform: None,
                groups: (64, 1, 1),
            };
            ctx.run("spin", "-", &pipe, &[d])
        };
        let secs = ctx.gpu_seconds("spin", "-", run).unwrap();
        assert!(secs.is_finite() && secs > 0.0, "{secs}");
        if !ctx.caps.timestamps {
            return;
        }
        // Under --profile the timed dispatches still reach the user's profile, and the outer
        // profile's own dispatches are kept.
        ctx.start_profiling().unwrap();
        run().unwrap();
        let secs = ctx.gpu_seconds("spin", "-", run).unwrap();
        let p = ctx.take_profile().unwrap().unwrap();
        let f = p.families.values().find(|f| f.dispatches > 0).unwrap();
        assert_eq!(f.dispatches, 2);
        assert!(secs > 0.0 && secs < f.seconds, "{secs} of {}", f.seconds);
        // An error inside is returned, and the outer profile is restored (here: none).
        let e = ctx.gpu_seconds("spin", "-", || Err(Error::invalid("inner failure")));
        assert!(e.unwrap_err().to_string().contains("inner failure"));
        assert!(ctx.take_profile().unwrap().is_none());
    }

    #[test]
    fn pipelines_are_cached_per_variant() {
        let ctx = ctx();
        let src = "@group(0) @binding(0) var<storage, read_write> o: array<u32>;\n@compute @workgroup_size(1) fn main() { o[0] = 7u; }";
        let a = ctx.pipeline("k", src, "main", false).unwrap();
        let b = ctx.pipeline("k", src, "main", false).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn dumped_shaders_are_the_complete_source_of_each_pipeline() {
        let dir = std::env::temp_dir().join(format!("wgpress-dump-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ctx = GpuContext::new(&ContextOptions {
            checked_shaders: true,
            dump_shaders: Some(dir.clone()),
            ..Default::default()
        })
        .unwrap();
        let src = "@group(0) @binding(0) var<storage, read_write> o: array<u32>;\n@compute @workgroup_size(1) fn entry_x() { o[0] = 7u; }";
        ctx.pipeline("dump test/k", src, "entry_x", true).unwrap();
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_string_lossy().to_string();
        // Checked context: the trusted request still builds with checks, and the name says so.
        assert_eq!(name, "dump_test_k_entry_x_false.wgsl");
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert!(text.ends_with(src), "{text}");
        naga::front::wgsl::parse_str(&text).expect("the dump parses as WGSL");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn explicit_adapter_selection_errors_are_clear() {
        let e = GpuContext::new(&ContextOptions {
            adapter: Some("no-such-gpu-anywhere".into()),
            ..Default::default()
        })
        .err()
        .expect("selector matched nothing");
        assert!(e.to_string().contains("no-such-gpu-anywhere"), "{e}");
        let e = GpuContext::new(&ContextOptions {
            adapter: Some("99".into()),
            ..Default::default()
        })
        .err()
        .expect("index out of range");
        assert!(e.to_string().contains("out of range"), "{e}");
    }
}
