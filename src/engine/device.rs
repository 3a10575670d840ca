//! Where the model runs: `model.device` parsed (`cpu`, `cuda`, `cuda:N`, `auto`) and resolved to
//! a candle [`Device`] at start. A GPU is only reachable from a binary built with the `cuda`
//! feature; asking for one without it is a start-up error that says so, never a silent CPU.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// The `model.device` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// CUDA device ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The first CUDA device when this binary has CUDA and the machine a working GPU, else the
    /// CPU.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => return Ok(Self::Cpu),
            "auto" => return Ok(Self::Auto),
            "cuda" | "gpu" => return Ok(Self::Cuda(0)),
            _ => {}
        }
        let ordinal = s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n < 64);
        ordinal.map(Self::Cuda).ok_or_else(|| {
            format!("`{s}` is not a device: use \"cpu\", \"cuda\", \"cuda:N\" (N < 64) or \"auto\"")
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub fn cuda_built() -> bool {
    candle_core::utils::cuda_is_available()
}

impl DeviceSpec {
    /// The device to load the model on. `auto` falls back to the CPU (with a warning when the
    /// binary has CUDA but no GPU answered); an explicit `cuda:N` that cannot be opened is an
    /// error naming the reason.
    pub fn resolve(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
            Self::Auto if !cuda_built() => Ok(Device::Cpu),
            Self::Auto => open_cuda(0).or_else(|e| {
                tracing::warn!(reason = %e, "model.device = auto: no usable GPU, using the CPU");
                Ok(Device::Cpu)
            }),
        }
    }
}

fn open_cuda(ordinal: usize) -> Result<Device, String> {
    if !cuda_built() {
        return Err(format!(
            "model.device = cuda:{ordinal}, but this binary was built without the `cuda` \
             feature: build it with `cargo build --release --features cuda` (docs/gpu.md) or \
             set model.device = \"cpu\""
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("model.device = cuda:{ordinal}: {e}"))
}

/// How a device is named in logs and `/v1/models`-style reports.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_form() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!(" CPU ".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "cuda:64", "tpu", "metal"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(err.contains("not a device"), "{bad}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(2), DeviceSpec::Auto] {
            assert_eq!(spec.to_string().parse(), Ok(spec));
        }
    }

    #[test]
    fn cpu_and_auto_resolve_without_a_gpu() {
        assert!(DeviceSpec::Cpu.resolve().is_ok_and(|d| d.is_cpu()));
        if !cuda_built() {
            assert!(DeviceSpec::Auto.resolve().is_ok_and(|d| d.is_cpu()));
            let err = DeviceSpec::Cuda(0).resolve().unwrap_err();
            assert!(err.contains("without the `cuda` feature"), "{err}");
            assert!(err.contains("model.device"), "{err}");
        }
    }
}
