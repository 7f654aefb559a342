//! Device and dtype selection from the configuration strings.
use tch::{Device, Kind};

use crate::config::ConfigError;

/// `auto` picks `cuda:0` when libtorch sees a GPU, else the CPU.
pub fn parse_device(spec: &str) -> Result<Device, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: "device",
        message,
    };
    match spec.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => Err(invalid(format!(
                "`{spec}`: expected auto, cpu, cuda or cuda:N"
            ))),
        },
    }
}

fn cuda(n: usize) -> Result<Device, ConfigError> {
    let count = tch::Cuda::device_count() as usize;
    if n < count {
        Ok(Device::Cuda(n))
    } else {
        Err(ConfigError::Invalid {
            key: "device",
            message: format!("cuda:{n} requested but libtorch sees {count} CUDA device(s)"),
        })
    }
}

/// `auto` is bfloat16 on CUDA and float32 on the CPU (CPU half-precision kernels are slow).
pub fn parse_dtype(spec: &str, device: Device) -> Result<Kind, ConfigError> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => Ok(if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        }),
        "float32" | "fp32" | "f32" => Ok(Kind::Float),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "fp16" | "f16" | "half" => Ok(Kind::Half),
        _ => Err(ConfigError::Invalid {
            key: "dtype",
            message: format!("`{spec}`: expected auto, float32, bfloat16 or float16"),
        }),
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:999").is_err());
        assert_eq!(parse_dtype("auto", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(
            parse_dtype("auto", Device::Cuda(0)).unwrap(),
            Kind::BFloat16
        );
        assert_eq!(parse_dtype("bf16", Device::Cpu).unwrap(), Kind::BFloat16);
        assert!(parse_dtype("int8", Device::Cpu).is_err());
    }
}
