//! Where work runs: the GPU context when wgpu finds an adapter, otherwise the CPU reference path with
//! a clear warning, so every command works on a machine without any GPU driver.

use crate::error::{Error, Result};
use crate::gpu::{ContextOptions, GpuContext};

pub enum Engine {
    Gpu(Box<GpuContext>),
    Cpu,
}

impl Engine {
    /// Opens the GPU unless `force_cpu`; when no adapter can be used, warns and falls back to the CPU.
    /// An explicit `--adapter` that matches nothing is an error, not a silent fallback.
    pub fn new(opts: &ContextOptions, force_cpu: bool) -> Result<Self> {
        if force_cpu {
            log::info!("running on the CPU reference path (--cpu)");
            return Ok(Engine::Cpu);
        }
        match GpuContext::new(opts) {
            Ok(ctx) => Ok(Engine::Gpu(Box::new(ctx))),
            Err(e @ Error::NoAdapter(_)) if opts.adapter.is_none() => {
                log::warn!(
                    "{e}; falling back to the CPU reference path (much slower; install a Vulkan driver, e.g. mesa-vulkan-drivers, to use a GPU)"
                );
                Ok(Engine::Cpu)
            }
            Err(e) => Err(e),
        }
    }

    pub fn gpu(&self) -> Option<&GpuContext> {
        match self {
            Engine::Gpu(c) => Some(c),
            Engine::Cpu => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Engine::Gpu(c) => format!(
                "{}{}",
                c.adapter,
                if c.software {
                    " [software adapter]"
                } else {
                    ""
                }
            ),
            Engine::Cpu => "CPU reference path (no GPU adapter)".into(),
        }
    }
}
