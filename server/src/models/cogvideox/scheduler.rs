//! diffusers `CogVideoXDDIMScheduler` and `CogVideoXDPMScheduler`, as CogVideoXPipeline drives
//! them. Both share one schedule: betas -> ᾱ (`alphas_cumprod`), SNR-shifted
//! `ᾱ' = ᾱ / (s + (1 - s)·ᾱ)`, optionally rescaled to zero terminal SNR, and integer timesteps
//! (`linspace`, `leading` or `trailing` spacing). They differ in the step:
//!
//! * DDIM (η = 0): `x0 = f(model_output)`, `x_prev = a·x + b·x0` with
//!   `a = √((1 - ᾱ_prev) / (1 - ᾱ_t))`, `b = √ᾱ_prev - √ᾱ_t·a`.
//! * DPM: DPM-Solver++(2M) with fresh noise every step, second order from the previous step's
//!   `x0` (`old_pred_original_sample`) and the previous schedule timestep. The noise is an explicit
//!   input, a closure [`CogVideoXScheduler::step`] calls once per diffusers `randn` draw (see
//!   [`CogVideoXScheduler::noise_draws`] for the count), so a pipeline can replay diffusers' RNG
//!   stream from a seeded libtorch generator.
//!
//! Both step from `t` to `prev_timestep = t - num_train_timesteps / num_steps` (integer division),
//! not to the schedule's next timestep: the two differ when the step count does not divide
//! `num_train_timesteps` (e.g. trailing, 7 steps: 999 -> 857, while the schedule's next is 856).
//!
//! The schedule is computed with the same libtorch ops and dtypes diffusers uses (float64 for
//! `scaled_linear` betas, float32 for `linear`), and the step's coefficients as 0-d tensors of
//! that dtype, multiplied in diffusers' operand order (which matters for half-precision samples),
//! so both are bit for bit diffusers'. `clip_sample`, `clip_sample_range`,
//! `sample_max_value` and the pipeline's `eta` are accepted and have no effect: diffusers' CogVideoX
//! steps never read them.
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::models::scheduler::linspace;
use crate::models::weights::read_json;
use crate::models::{ModelError, Result};

/// The diffusers classes a CogVideoX `scheduler_config.json` may name.
pub const DDIM_CLASS: &str = "CogVideoXDDIMScheduler";
pub const DPM_CLASS: &str = "CogVideoXDPMScheduler";

/// `scheduler/scheduler_config.json`, with diffusers' defaults for absent keys (the same for both
/// classes; the DPM docstring's "linear, 0.0001 to 0.02" is not what its code does).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CogVideoXSchedulerConfig {
    /// `CogVideoXDDIMScheduler` or `CogVideoXDPMScheduler`.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: i64,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `scaled_linear` or `linear` (`squaredcos_cap_v2` is rejected).
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// Accepted only when absent or null.
    #[serde(default)]
    pub trained_betas: Option<serde_json::Value>,
    /// The last step's `ᾱ_prev` (when `prev_timestep < 0`) is 1, else `ᾱ[0]`.
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps.
    #[serde(default)]
    pub steps_offset: i64,
    /// `epsilon`, `sample` or `v_prediction`.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// `linspace`, `leading` or `trailing`.
    #[serde(default = "default_timestep_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// `s` in `ᾱ / (s + (1 - s)·ᾱ)` (3.0 for CogVideoX-2b, 1.0, no shift, for 5b).
    #[serde(default = "default_snr_shift_scale")]
    pub snr_shift_scale: f64,
}

fn default_num_train_timesteps() -> i64 {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> String {
    "scaled_linear".into()
}
fn default_true() -> bool {
    true
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_timestep_spacing() -> String {
    "leading".into()
}
fn default_snr_shift_scale() -> f64 {
    3.0
}

/// Which step rule the config's `_class_name` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Dpm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    Sample,
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The config's string options, checked.
#[derive(Debug, Clone, Copy)]
struct Options {
    kind: SchedulerKind,
    beta_schedule: BetaSchedule,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
}

impl CogVideoXSchedulerConfig {
    /// Rejects options this implementation does not reproduce, naming the key.
    fn validate(&self, path: &Path) -> Result<Options> {
        let kind = match self.class_name.as_deref() {
            Some(DDIM_CLASS) => SchedulerKind::Ddim,
            Some(DPM_CLASS) => SchedulerKind::Dpm,
            Some(other) => {
                return Err(ModelError::UnknownClass {
                    path: path.to_path_buf(),
                    class: other.to_owned(),
                    expected: format!("{DDIM_CLASS} or {DPM_CLASS}"),
                })
            }
            None => return Err(ModelError::config(path, "_class_name", "missing")),
        };
        let unsupported = |key: &str, value: &str, supported: &str| {
            ModelError::config(
                path,
                key,
                format!("unsupported `{value}` (supported: {supported})"),
            )
        };
        let beta_schedule = match self.beta_schedule.as_str() {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            other => return Err(unsupported("beta_schedule", other, "linear, scaled_linear")),
        };
        let prediction_type = match self.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "sample" => PredictionType::Sample,
            "v_prediction" => PredictionType::VPrediction,
            other => {
                return Err(unsupported(
                    "prediction_type",
                    other,
                    "epsilon, sample, v_prediction",
                ))
            }
        };
        let timestep_spacing = match self.timestep_spacing.as_str() {
            "linspace" => TimestepSpacing::Linspace,
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            other => {
                return Err(unsupported(
                    "timestep_spacing",
                    other,
                    "linspace, leading, trailing",
                ))
            }
        };
        if self.trained_betas.as_ref().is_some_and(|b| !b.is_null()) {
            return Err(ModelError::config(
                path,
                "trained_betas",
                "not supported (only null)",
            ));
        }
        if self.num_train_timesteps < 2 {
            return Err(ModelError::config(
                path,
                "num_train_timesteps",
                format!("must be at least 2, got {}", self.num_train_timesteps),
            ));
        }
        for (key, value) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !(value.is_finite() && (0.0..1.0).contains(&value)) {
                return Err(ModelError::config(
                    path,
                    key,
                    format!("must be in [0, 1), got {value}"),
                ));
            }
        }
        if !self.snr_shift_scale.is_finite() || self.snr_shift_scale <= 0.0 {
            return Err(ModelError::config(
                path,
                "snr_shift_scale",
                format!("must be positive, got {}", self.snr_shift_scale),
            ));
        }
        // diffusers would index `alphas_cumprod` from the end with a negative timestep.
        if self.steps_offset < 0 {
            return Err(ModelError::config(
                path,
                "steps_offset",
                format!("must not be negative, got {}", self.steps_offset),
            ));
        }
        Ok(Options {
            kind,
            beta_schedule,
            prediction_type,
            timestep_spacing,
        })
    }
}

/// One step's result.
#[derive(Debug)]
pub struct StepOutput {
    /// `x_{t-1}`, the next step's sample.
    pub prev_sample: Tensor,
    /// The step's `x0` estimate; a DPM pipeline passes it to the next step.
    pub pred_original_sample: Tensor,
}

/// Either CogVideoX scheduler (chosen by `_class_name`) and, after
/// [`set_timesteps`](Self::set_timesteps), one schedule.
#[derive(Debug)]
pub struct CogVideoXScheduler {
    config: CogVideoXSchedulerConfig,
    options: Options,
    /// `ᾱ` per training timestep, `[num_train_timesteps]`, float64 (scaled_linear) or float32
    /// (linear) on the CPU, as in diffusers.
    alphas_cumprod: Tensor,
    /// `ᾱ_prev` past the end: `torch.tensor(1.0)` (a float32 0-d tensor) or `ᾱ[0]`.
    final_alpha_cumprod: Tensor,
    /// Model timesteps, descending.
    timesteps: Vec<i64>,
}

impl CogVideoXScheduler {
    /// Reads `scheduler_config.json` from a diffusers `scheduler/` folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("scheduler_config.json");
        let config: CogVideoXSchedulerConfig = read_json(&path)?;
        Self::new(config, &path)
    }

    /// A scheduler from a parsed config (`path` names it in errors).
    pub fn new(config: CogVideoXSchedulerConfig, path: &Path) -> Result<Self> {
        let options = config.validate(path)?;
        let n = config.num_train_timesteps;
        let cpu = Device::Cpu;
        let betas = match options.beta_schedule {
            BetaSchedule::Linear => {
                Tensor::linspace(config.beta_start, config.beta_end, n, (Kind::Float, cpu))
            }
            // "Very specific to the latent diffusion model": linear in √β, in float64.
            BetaSchedule::ScaledLinear => Tensor::linspace(
                config.beta_start.powf(0.5),
                config.beta_end.powf(0.5),
                n,
                (Kind::Double, cpu),
            )
            .pow_tensor_scalar(2),
        };
        let alphas_cumprod = one_minus(&betas).cumprod(0, None::<Kind>);
        // SNR shift following SD3.
        let s = config.snr_shift_scale;
        let mut alphas_cumprod = &alphas_cumprod / (&alphas_cumprod * (1.0 - s) + s);
        if config.rescale_betas_zero_snr {
            alphas_cumprod = rescale_zero_terminal_snr(&alphas_cumprod);
        }
        let final_alpha_cumprod = if config.set_alpha_to_one {
            Tensor::from(1.0f32)
        } else {
            alphas_cumprod.get(0)
        };
        Ok(Self {
            config,
            options,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
        })
    }

    /// The parsed `scheduler_config.json`.
    pub fn config(&self) -> &CogVideoXSchedulerConfig {
        &self.config
    }

    /// DDIM or DPM.
    pub fn kind(&self) -> SchedulerKind {
        self.options.kind
    }

    /// `ᾱ` per training timestep, `[num_train_timesteps]` (float64, or float32 for linear betas).
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// Computes the `num_steps` timesteps of the configured spacing (Table 2 of "Common Diffusion
    /// Noise Schedules and Sample Steps are Flawed"), with numpy's float64 arithmetic:
    /// * `linspace`: `round(linspace(0, T - 1, n))`, descending;
    /// * `leading`: `k·(T // n) + steps_offset`, k = n-1..0;
    /// * `trailing`: `round(arange(T, 0, -T/n)) - 1`.
    pub fn set_timesteps(&mut self, num_steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        if num_steps == 0 || num_steps as i64 > train {
            return Err(ModelError::invalid_input(
                "steps",
                format!("must be in 1..={train} (num_train_timesteps), got {num_steps}"),
            ));
        }
        let n = num_steps as i64;
        let timesteps: Vec<i64> = match self.options.timestep_spacing {
            TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, num_steps)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = train / n;
                (0..n)
                    .rev()
                    .map(|k| k * ratio + self.config.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                numpy_arange(train as f64, 0.0, -(train as f64 / n as f64))
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t >= train) {
            // Only `leading` with a large `steps_offset` gets here; diffusers fails indexing ᾱ.
            return Err(ModelError::invalid_input(
                "steps",
                format!(
                    "{num_steps} steps with steps_offset {} reach timestep {t} >= num_train_timesteps {train}",
                    self.config.steps_offset
                ),
            ));
        }
        self.timesteps = timesteps;
        Ok(())
    }

    /// Model timesteps of the current schedule, descending (the value the transformer gets).
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// Steps in the current schedule (0 before `set_timesteps`).
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// `prev_timestep` of step `step_index`: `t - T // n`, negative on a last step that goes past 0.
    pub fn prev_timestep(&self, step_index: usize) -> i64 {
        self.timesteps[step_index] - self.config.num_train_timesteps / self.num_steps() as i64
    }

    /// How many `randn(sample shape)` tensors step `step_index` draws, in diffusers and in
    /// [`step`](Self::step): none for DDIM; for DPM one at step 0 (no `old_pred_original_sample`),
    /// one at a step whose `prev_timestep < 0`, else two, of which diffusers throws the first away
    /// (it computes the first-order sample with it, then replaces it by the second-order one).
    pub fn noise_draws(&self, step_index: usize, has_old_pred_original_sample: bool) -> usize {
        match self.options.kind {
            SchedulerKind::Ddim => 0,
            SchedulerKind::Dpm
                if !has_old_pred_original_sample || self.prev_timestep(step_index) < 0 =>
            {
                1
            }
            SchedulerKind::Dpm => 2,
        }
    }

    /// One step from `timesteps[step_index]`, as CogVideoXPipeline calls it.
    ///
    /// `old_pred_original_sample` is the previous step's
    /// [`StepOutput::pred_original_sample`] (`None` at step 0); DDIM ignores it.
    ///
    /// `draw_noise` is called [`noise_draws`](Self::noise_draws) times, in order, for a tensor of
    /// `sample`'s shape and dtype on its device. diffusers draws them with
    /// `randn_tensor(sample.shape, generator, dtype=sample.dtype)` from the pipeline's generator,
    /// right after the initial latents' draw; with a CPU generator seeded `s`, `tch::manual_seed(s)`,
    /// the latents' `Tensor::randn(shape, (kind, Device::Cpu))`, then
    /// `|| Tensor::randn(shape, (sample.kind(), Device::Cpu)).to_device(device)` reproduces that
    /// stream bit for bit (the dtype matters: a half draw is not a float draw cast to half).
    ///
    /// Coefficients are 0-d tensors in `ᾱ`'s dtype, so with a float32 `sample` the result is float32
    /// as in diffusers. Panics past the end of the schedule, or for DPM when
    /// `old_pred_original_sample` is given at step 0 (diffusers has no look-back timestep there).
    pub fn step(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        step_index: usize,
        old_pred_original_sample: Option<&Tensor>,
        draw_noise: &mut dyn FnMut() -> Tensor,
    ) -> StepOutput {
        assert!(
            step_index < self.num_steps(),
            "scheduler step {step_index} past the end of a {}-step schedule",
            self.num_steps()
        );
        let t = self.timesteps[step_index];
        let prev_t = self.prev_timestep(step_index);
        let alpha_prod_t = self.alphas_cumprod.get(t);
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alphas_cumprod.get(prev_t)
        } else {
            self.final_alpha_cumprod.shallow_clone()
        };
        let beta_prod_t = one_minus(&alpha_prod_t);
        let pred_original_sample = match self.options.prediction_type {
            PredictionType::Epsilon => {
                (sample - beta_prod_t.pow_tensor_scalar(0.5) * model_output)
                    / alpha_prod_t.pow_tensor_scalar(0.5)
            }
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => {
                alpha_prod_t.pow_tensor_scalar(0.5) * sample
                    - beta_prod_t.pow_tensor_scalar(0.5) * model_output
            }
        };
        let prev_sample = match self.options.kind {
            SchedulerKind::Ddim => {
                let a_t = (one_minus(&alpha_prod_t_prev) / one_minus(&alpha_prod_t))
                    .pow_tensor_scalar(0.5);
                let b_t = alpha_prod_t_prev.pow_tensor_scalar(0.5)
                    - alpha_prod_t.pow_tensor_scalar(0.5) * &a_t;
                a_t * sample + b_t * &pred_original_sample
            }
            SchedulerKind::Dpm => self.dpm_solver_step(
                sample,
                &pred_original_sample,
                step_index,
                (&alpha_prod_t, &alpha_prod_t_prev, prev_t),
                old_pred_original_sample,
                draw_noise,
            ),
        };
        StepOutput {
            prev_sample,
            pred_original_sample,
        }
    }

    /// DPM-Solver++(2M) in log-SNR `λ = log √(ᾱ / (1 - ᾱ))`, `h = λ_prev - λ_t`:
    /// `x_prev = m1·x - m2·D + σ_noise·ε` with `m1 = √((1 - ᾱ_prev) / (1 - ᾱ_t))·e^-h`,
    /// `m2 = expm1(-2h)·√ᾱ_prev`, `σ_noise = √(1 - ᾱ_prev)·√(1 - e^-2h)`, and `D = x0` (first
    /// order) or `(1 + 1/2r)·x0 - (1/2r)·x0_old` with `r = h_last / h` (second order).
    fn dpm_solver_step(
        &self,
        sample: &Tensor,
        pred_original_sample: &Tensor,
        step_index: usize,
        (alpha_prod_t, alpha_prod_t_prev, prev_t): (&Tensor, &Tensor, i64),
        old_pred_original_sample: Option<&Tensor>,
        draw_noise: &mut dyn FnMut() -> Tensor,
    ) -> Tensor {
        let lambda = |alpha_prod: &Tensor| {
            (alpha_prod / one_minus(alpha_prod))
                .pow_tensor_scalar(0.5)
                .log()
        };
        let lamb = lambda(alpha_prod_t);
        let h = lambda(alpha_prod_t_prev) - &lamb;
        let mult1 = (one_minus(alpha_prod_t_prev) / one_minus(alpha_prod_t)).pow_tensor_scalar(0.5)
            * (-&h).exp();
        let mult2 = (&h * -2).expm1() * alpha_prod_t_prev.pow_tensor_scalar(0.5);
        let mult_noise = one_minus(alpha_prod_t_prev).pow_tensor_scalar(0.5)
            * one_minus(&(&h * -2).exp()).pow_tensor_scalar(0.5);

        // The first draw is always made; with a history it only advances the RNG stream.
        let noise = draw_noise();
        let old = match old_pred_original_sample {
            Some(old) if prev_t >= 0 => old,
            _ => return &mult1 * sample - &mult2 * pred_original_sample + &mult_noise * noise,
        };
        assert!(
            step_index > 0,
            "old_pred_original_sample given at step 0, which has no previous timestep"
        );
        let alpha_prod_t_back = self.alphas_cumprod.get(self.timesteps[step_index - 1]);
        let r = (lamb - lambda(&alpha_prod_t_back)) / &h;
        let mult4 = (r * 2).reciprocal();
        let mult3 = 1f64 + &mult4;
        let denoised_d = mult3 * pred_original_sample - mult4 * old;
        let noise = draw_noise();
        mult1 * sample - mult2 * denoised_d + mult_noise * noise
    }
}

/// `1 - x` as Python computes it (`torch.rsub`). tch's `1.0 - x` is `-(x - 1)`, which is -0 rather
/// than 0 at `x = 1`, and `1 / -0` is `-inf`: the last DPM step's `λ_prev` would turn NaN.
fn one_minus(x: &Tensor) -> Tensor {
    x.rsub_scalar(1)
}

/// diffusers `rescale_zero_terminal_snr` (Algorithm 1 of "Common Diffusion Noise Schedules and
/// Sample Steps are Flawed"), applied to `ᾱ`: shift `√ᾱ` so its last value is 0, scale it so its
/// first is unchanged.
fn rescale_zero_terminal_snr(alphas_cumprod: &Tensor) -> Tensor {
    let sqrt = alphas_cumprod.sqrt();
    let first = sqrt.get(0);
    let last = sqrt.get(-1);
    let scale = &first / (&first - &last);
    ((sqrt - last) * scale).pow_tensor_scalar(2)
}

/// `np.arange(start, stop, step)` in float64: `ceil((stop - start) / step)` values `start`,
/// `start + step`, then `start + i·d`, where numpy's fill takes `d = (start + step) - start`.
fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let second = start + step;
    let d = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * d,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(json: &str) -> Result<CogVideoXScheduler> {
        let config: CogVideoXSchedulerConfig = serde_json::from_str(json).unwrap();
        CogVideoXScheduler::new(config, Path::new("scheduler/scheduler_config.json"))
    }

    fn err(json: &str) -> String {
        scheduler(json).unwrap_err().to_string()
    }

    #[test]
    fn trailing_schedule_of_the_guide() {
        // cogvideox.md: 50 trailing steps are t = 999 - 20k.
        let mut s = scheduler(
            r#"{"_class_name": "CogVideoXDDIMScheduler", "timestep_spacing": "trailing"}"#,
        )
        .unwrap();
        s.set_timesteps(50).unwrap();
        let expected: Vec<i64> = (0..50).map(|k| 999 - 20 * k).collect();
        assert_eq!(s.timesteps(), expected);
        assert_eq!(s.prev_timestep(49), -1);
        assert_eq!(s.noise_draws(3, true), 0);
    }

    #[test]
    fn dpm_draw_counts() {
        let mut s = scheduler(
            r#"{"_class_name": "CogVideoXDPMScheduler", "timestep_spacing": "trailing"}"#,
        )
        .unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), [999, 749, 499, 249]);
        let draws: Vec<usize> = (0..4).map(|i| s.noise_draws(i, i > 0)).collect();
        assert_eq!(draws, [1, 2, 2, 1]);
        // The step calls `draw_noise` exactly that often.
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let mut old = None;
        for (i, &expected) in draws.iter().enumerate() {
            let mut calls = 0;
            let out = s.step(&x, &x, i, old.as_ref(), &mut || {
                calls += 1;
                Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))
            });
            assert_eq!(calls, expected, "step {i}");
            old = Some(out.pred_original_sample);
        }
    }

    #[test]
    fn rejects_what_it_does_not_implement() {
        for (json, key) in [
            (
                r#"{"_class_name": "CogVideoXDDIMScheduler", "beta_schedule": "squaredcos_cap_v2"}"#,
                "`beta_schedule`",
            ),
            (
                r#"{"_class_name": "CogVideoXDDIMScheduler", "trained_betas": [0.1, 0.2]}"#,
                "`trained_betas`",
            ),
            (
                r#"{"_class_name": "CogVideoXDPMScheduler", "timestep_spacing": "karras"}"#,
                "`timestep_spacing`",
            ),
            (
                r#"{"_class_name": "CogVideoXDPMScheduler", "prediction_type": "flow"}"#,
                "`prediction_type`",
            ),
            (
                r#"{"_class_name": "CogVideoXDPMScheduler", "snr_shift_scale": 0}"#,
                "`snr_shift_scale`",
            ),
            (
                r#"{"_class_name": "CogVideoXDPMScheduler", "steps_offset": -1}"#,
                "`steps_offset`",
            ),
            (r#"{"timestep_spacing": "trailing"}"#, "`_class_name`"),
        ] {
            let e = err(json);
            assert!(
                e.contains("scheduler_config.json") && e.contains(key),
                "{json}: {e}"
            );
        }
        let e = err(r#"{"_class_name": "DDIMScheduler"}"#);
        assert!(e.contains("DDIMScheduler") && e.contains(DPM_CLASS), "{e}");
    }

    #[test]
    fn rejects_impossible_step_counts() {
        let mut s =
            scheduler(r#"{"_class_name": "CogVideoXDDIMScheduler", "steps_offset": 30}"#).unwrap();
        assert!(s.set_timesteps(0).is_err());
        assert!(s.set_timesteps(1001).is_err());
        // leading, 2 steps: [500, 0] + 30 is fine; 1000 steps: 999 + 30 is past the end.
        s.set_timesteps(2).unwrap();
        assert_eq!(s.timesteps(), [530, 30]);
        let e = s.set_timesteps(1000).unwrap_err().to_string();
        assert!(e.contains("1029"), "{e}");
    }

    #[test]
    fn numpy_arange_fills_like_numpy() {
        assert_eq!(
            numpy_arange(1000.0, 0.0, -250.0),
            [1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(numpy_arange(1000.0, 0.0, -1000.0), [1000.0]);
        assert!(numpy_arange(0.0, 1.0, -1.0).is_empty());
    }
}
