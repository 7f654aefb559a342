//! diffusers `FlowMatchEulerDiscreteScheduler`, as FluxPipeline drives it: sigmas
//! `linspace(1, 1/n, n)`, shifted (statically, or by a resolution-dependent `mu`), then plain Euler
//! steps on the velocity.
//!
//! diffusers computes the schedule with numpy on float32 arrays (Python scalars do not widen them),
//! so the arithmetic below is done in `f32`, operation by operation, to reproduce its sigmas
//! bit for bit.
use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::weights::read_json;
use super::{ModelError, Result};

/// The diffusers class a `scheduler_config.json` must name.
pub const SCHEDULER_CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// How `mu` shifts the schedule under dynamic shifting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeShiftType {
    /// `e^mu / (e^mu + (1/t - 1))` (FLUX).
    Exponential,
    /// `mu / (mu + (1/t - 1))`.
    Linear,
}

/// `scheduler/scheduler_config.json`, with diffusers' defaults for absent keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    /// Must be `FlowMatchEulerDiscreteScheduler`.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: u32,
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "default_base_shift")]
    pub base_shift: Option<f64>,
    #[serde(default = "default_max_shift")]
    pub max_shift: Option<f64>,
    #[serde(default = "default_base_image_seq_len")]
    pub base_image_seq_len: u32,
    #[serde(default = "default_max_image_seq_len")]
    pub max_image_seq_len: u32,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default = "default_time_shift_type")]
    pub time_shift_type: TimeShiftType,
    // Accepted only when false (see `validate`).
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
    #[serde(default)]
    pub use_flow_sigmas: bool,
}

fn default_num_train_timesteps() -> u32 {
    1000
}
fn default_shift() -> f64 {
    1.0
}
fn default_base_shift() -> Option<f64> {
    Some(0.5)
}
fn default_max_shift() -> Option<f64> {
    Some(1.15)
}
fn default_base_image_seq_len() -> u32 {
    256
}
fn default_max_image_seq_len() -> u32 {
    4096
}
fn default_time_shift_type() -> TimeShiftType {
    TimeShiftType::Exponential
}

impl SchedulerConfig {
    /// Rejects options this implementation does not reproduce, naming the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        match self.class_name.as_deref() {
            Some(SCHEDULER_CLASS) => {}
            Some(other) => {
                return Err(ModelError::UnknownClass {
                    path: path.to_path_buf(),
                    class: other.to_owned(),
                    expected: SCHEDULER_CLASS.to_owned(),
                })
            }
            None => return Err(ModelError::config(path, "_class_name", "missing")),
        }
        let unsupported = [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
            // FluxPipeline drops its sigmas for these and falls back to the default schedule.
            ("use_flow_sigmas", self.use_flow_sigmas),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(ModelError::config(
                path,
                key,
                "true is not supported (only false)",
            ));
        }
        if self.num_train_timesteps == 0 {
            return Err(ModelError::config(
                path,
                "num_train_timesteps",
                "must be positive",
            ));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(ModelError::config(
                path,
                "shift",
                format!("must be positive, got {}", self.shift),
            ));
        }
        if self.use_dynamic_shifting {
            for (key, value) in [
                ("base_shift", self.base_shift),
                ("max_shift", self.max_shift),
            ] {
                if !value.is_some_and(f64::is_finite) {
                    return Err(ModelError::config(
                        path,
                        key,
                        "a number is required with use_dynamic_shifting",
                    ));
                }
            }
            if self.base_image_seq_len == self.max_image_seq_len {
                return Err(ModelError::config(
                    path,
                    "max_image_seq_len",
                    "must differ from base_image_seq_len (the shift is interpolated between them)",
                ));
            }
        }
        if let Some(terminal) = self.shift_terminal {
            if !(0.0..1.0).contains(&terminal) {
                return Err(ModelError::config(
                    path,
                    "shift_terminal",
                    format!("must be in [0, 1), got {terminal}"),
                ));
            }
        }
        Ok(())
    }

    /// FluxPipeline's `calculate_shift`: `mu` interpolated linearly in the image sequence length
    /// between (`base_image_seq_len`, `base_shift`) and (`max_image_seq_len`, `max_shift`).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        calculate_shift(
            image_seq_len,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift.unwrap_or(0.5),
            self.max_shift.unwrap_or(1.15),
        )
    }
}

/// diffusers `calculate_shift` (in f64, like Python).
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: u32,
    max_seq_len: u32,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (f64::from(max_seq_len) - f64::from(base_seq_len));
    let b = base_shift - m * f64::from(base_seq_len);
    image_seq_len as f64 * m + b
}

/// The scheduler: its config and, after [`set_timesteps`](Self::set_timesteps), one schedule.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: SchedulerConfig,
    /// `n + 1` noise levels, the last one terminal (0, or 1 with `invert_sigmas`).
    sigmas: Vec<f32>,
    /// `n` model timesteps on the `num_train_timesteps` scale.
    timesteps: Vec<f32>,
}

impl FlowMatchEulerDiscreteScheduler {
    /// Reads `scheduler_config.json` from a diffusers `scheduler/` folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("scheduler_config.json");
        let config: SchedulerConfig = read_json(&path)?;
        Self::new(config, &path)
    }

    /// A scheduler from a parsed config (`path` names it in errors).
    pub fn new(config: SchedulerConfig, path: &Path) -> Result<Self> {
        config.validate(path)?;
        Ok(Self {
            config,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
        })
    }

    /// The parsed `scheduler_config.json`.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Computes the schedule of `num_steps` steps FluxPipeline asks for: sigmas
    /// `np.linspace(1.0, 1/n, n)`, shifted, optionally stretched to `shift_terminal`, with a
    /// terminal sigma appended. `mu` is required with dynamic shifting (see [`SchedulerConfig::mu`]).
    pub fn set_timesteps(&mut self, num_steps: usize, mu: Option<f64>) -> Result<()> {
        if num_steps == 0 {
            return Err(ModelError::invalid_input("steps", "must be at least 1"));
        }
        let c = &self.config;
        let mut sigmas: Vec<f32> = linspace(1.0, 1.0 / num_steps as f64, num_steps)
            .into_iter()
            .map(|s| s as f32)
            .collect();

        if c.use_dynamic_shifting {
            let mu = mu.ok_or_else(|| {
                ModelError::invalid_input("mu", "required with use_dynamic_shifting")
            })?;
            // `time_shift(mu, 1.0, t)`; `x ** 1.0` is exact and left out.
            let numerator = match c.time_shift_type {
                TimeShiftType::Exponential => mu.exp() as f32,
                TimeShiftType::Linear => mu as f32,
            };
            for s in &mut sigmas {
                *s = numerator / (numerator + (1.0 / *s - 1.0));
            }
        } else {
            let shift = c.shift as f32;
            let shift_minus_one = (c.shift - 1.0) as f32;
            for s in &mut sigmas {
                *s = shift * *s / (1.0 + shift_minus_one * *s);
            }
        }

        // `if self.config.shift_terminal:` (0 counts as off, like Python).
        if let Some(terminal) = c.shift_terminal.filter(|&t| t != 0.0) {
            let last = 1.0 - *sigmas.last().expect("at least one step");
            if last == 0.0 {
                // diffusers would divide 0 by 0 here and return NaN sigmas.
                return Err(ModelError::invalid_input(
                    "steps",
                    "shift_terminal needs at least 2 steps",
                ));
            }
            let scale = last / (1.0 - terminal) as f32;
            for s in &mut sigmas {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }

        let train = c.num_train_timesteps as f32;
        let terminal = if c.invert_sigmas {
            for s in &mut sigmas {
                *s = 1.0 - *s;
            }
            1.0
        } else {
            0.0
        };
        self.timesteps = sigmas.iter().map(|s| s * train).collect();
        sigmas.push(terminal);
        self.sigmas = sigmas;
        Ok(())
    }

    /// Noise levels of the current schedule, `num_steps + 1` values.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Model timesteps of the current schedule (`sigma × num_train_timesteps`), `num_steps` values.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// Steps in the current schedule (0 before `set_timesteps`).
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// One Euler step from `sigmas[step_index]` to `sigmas[step_index + 1]`:
    /// `prev = sample + (sigma_next - sigma) · model_output`, computed in f32 (diffusers upcasts
    /// the sample) and returned in `model_output`'s dtype. Panics past the end of the schedule.
    pub fn step(&self, model_output: &Tensor, sample: &Tensor, step_index: usize) -> Tensor {
        assert!(
            step_index < self.num_steps(),
            "scheduler step {step_index} past the end of a {}-step schedule",
            self.num_steps()
        );
        // A 0-d f32 tensor, so that type promotion matches diffusers' `dt * model_output`.
        let dt = Tensor::from(self.sigmas[step_index + 1] - self.sigmas[step_index]);
        let prev = sample.to_kind(Kind::Float) + dt * model_output;
        prev.to_kind(model_output.kind())
    }
}

/// `np.linspace(start, stop, num)` in f64 (numpy's formula: `start + i·step`, last = `stop`).
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let step = (stop - start) / div;
    let mut out: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    out[num - 1] = stop;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(json: &str) -> Result<FlowMatchEulerDiscreteScheduler> {
        let config: SchedulerConfig = serde_json::from_str(json).unwrap();
        FlowMatchEulerDiscreteScheduler::new(config, Path::new("scheduler/scheduler_config.json"))
    }

    const SCHNELL: &str = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0,
        "use_dynamic_shifting": false, "base_image_seq_len": 256, "max_image_seq_len": 4096,
        "base_shift": 0.5, "max_shift": 1.15, "num_train_timesteps": 1000}"#;
    const DEV: &str = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
        "use_dynamic_shifting": true, "base_image_seq_len": 256, "max_image_seq_len": 4096,
        "base_shift": 0.5, "max_shift": 1.15, "num_train_timesteps": 1000}"#;

    #[test]
    fn schnell_schedule_is_linear() {
        let mut s = scheduler(SCHNELL).unwrap();
        s.set_timesteps(4, None).unwrap();
        assert_eq!(s.sigmas(), [1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(s.timesteps(), [1000.0, 750.0, 500.0, 250.0]);
    }

    #[test]
    fn dev_schedule_matches_diffusers() {
        // FluxPipeline at 1024², 4 steps: image_seq_len 4096 -> mu = max_shift = 1.15. Values
        // printed by diffusers 0.42.1 (`pipe.scheduler.sigmas`).
        let mut s = scheduler(DEV).unwrap();
        let mu = s.config().mu(4096);
        assert!((mu - 1.15).abs() < 1e-12);
        s.set_timesteps(4, Some(mu)).unwrap();
        let expected = [1.0f32, 0.904_530_76, 0.759_510_93, 0.512_844_15, 0.0];
        assert_eq!(s.sigmas(), expected);
        assert!(s.set_timesteps(4, None).is_err());
    }

    #[test]
    fn euler_step() {
        let mut s = scheduler(SCHNELL).unwrap();
        s.set_timesteps(2, None).unwrap();
        let x = Tensor::from_slice(&[1f32, 2.0]);
        let v = Tensor::from_slice(&[2f32, -2.0]);
        let prev: Vec<f32> = Vec::try_from(s.step(&v, &x, 0)).unwrap();
        assert_eq!(prev, [0.0, 3.0]);
    }

    #[test]
    fn shift_terminal_and_inversion() {
        let json = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": 0.1,
            "invert_sigmas": true}"#;
        let mut s = scheduler(json).unwrap();
        s.set_timesteps(3, None).unwrap();
        // Before inversion the schedule ends at the terminal value 0.1; inverted, at 0.9.
        assert!(
            (s.sigmas()[2] - 0.9).abs() < 1e-6 && s.sigmas()[3] == 1.0,
            "{:?}",
            s.sigmas()
        );
        assert_eq!(s.sigmas()[0], 0.0);
    }

    #[test]
    fn rejects_unsupported_options() {
        let err = scheduler(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": true}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("scheduler_config.json") && err.contains("`use_karras_sigmas`"),
            "{err}"
        );
        let err = scheduler(r#"{"_class_name": "EulerDiscreteScheduler"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("EulerDiscreteScheduler"), "{err}");
    }

    #[test]
    fn numpy_linspace() {
        assert_eq!(linspace(1.0, 0.25, 4), [1.0, 0.75, 0.5, 0.25]);
        assert_eq!(linspace(1.0, 1.0, 1), [1.0]);
    }
}
