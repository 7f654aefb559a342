//! One generation's denoising with its cache strategy: the step loop's body, which the engine,
//! the parity tests and the benchmark all drive (there is no other copy of it).
//!
//! A [`Denoise`] owns the pipeline's generation state and the session's strategy instance (its
//! cached tensors); strategy switches and resets are applied between steps, and every step's
//! decisions, state size and estimated FLOPs are reported and totalled.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::cache::{self, CacheConfig, CacheStrategy};
use crate::dit::hooks::StepStats;
use crate::dit::pipeline::{AnyPipeline, Generation, Progress, StepCost, StepOutput};
use crate::dit::request::GenerationRequest;
use crate::error::{ServiceError, ServiceResult};

/// A change of cache strategy, applied at the next step boundary.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheChange {
    /// A fresh strategy of another (or the same) configuration.
    Switch(CacheConfig),
    /// The same configuration with empty state.
    Reset,
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub output: StepOutput,
    pub stats: StepStats,
    pub cost: StepCost,
    /// Bytes the strategy holds after the step.
    pub state_bytes: u64,
    /// Steps run by the current strategy since it was created (start, switch or reset), this
    /// one included.
    pub strategy_step: u32,
    /// A switch / reset took effect before this step.
    pub switched: bool,
    pub reset: bool,
    pub elapsed: Duration,
}

/// Running totals over a generation's steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub full_compute_steps: u32,
    pub flops_total: f64,
    pub flops_saved: f64,
}

impl Totals {
    /// The cost-weighted fraction of module executions the cache did not run: estimated FLOPs
    /// saved over estimated FLOPs in total. Weighting by cost lets attention-level strategies
    /// (PAB, FasterCache, TaylorSeer), which run every block, count too.
    pub fn cache_hit_ratio(&self) -> f32 {
        if self.flops_total > 0.0 {
            (self.flops_saved / self.flops_total) as f32
        } else {
            0.0
        }
    }
}

/// A generation in progress with its cache strategy.
pub struct Denoise {
    generation: Generation,
    /// The generation's step count, which some strategy defaults depend on.
    num_steps: usize,
    strategy: Box<dyn CacheStrategy>,
    /// As resolved for this generation ([`CacheConfig::for_generation`]).
    config: CacheConfig,
    strategy_step: u32,
    /// A switch / reset took effect since the last step (reported with the next one).
    switched: bool,
    reset: bool,
    totals: Totals,
    /// Steps keep the per-module decision record.
    record_modules: bool,
}

impl Denoise {
    /// Prepares the generation (prompt encoding, noise, schedule) and a fresh strategy.
    pub fn start(
        pipeline: &dyn AnyPipeline,
        request: &GenerationRequest,
        config: CacheConfig,
    ) -> ServiceResult<Self> {
        let generation = guarded("prompt encoding", || pipeline.prepare(request))??;
        let num_steps = pipeline.progress(&generation).num_steps;
        let config = config.for_generation(num_steps);
        let strategy = cache::build_strategy(&config, num_steps)?;
        Ok(Self {
            generation,
            num_steps,
            strategy,
            config,
            strategy_step: 0,
            switched: false,
            reset: false,
            totals: Totals::default(),
            record_modules: false,
        })
    }

    /// Every step's stats keep the per-module decision record ([`StepStats::record`]).
    pub fn recording_modules(mut self, on: bool) -> Self {
        self.record_modules = on;
        self
    }

    /// The strategy configuration in effect, resolved for this generation.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn strategy(&self) -> &dyn CacheStrategy {
        self.strategy.as_ref()
    }

    pub fn generation(&self) -> &Generation {
        &self.generation
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    pub fn progress(&self, pipeline: &dyn AnyPipeline) -> Progress {
        pipeline.progress(&self.generation)
    }

    /// Replaces the strategy before the next step: either way it restarts with empty state and
    /// its own step counter at 0.
    pub fn change_cache(&mut self, change: CacheChange) -> ServiceResult<()> {
        match change {
            CacheChange::Switch(config) => {
                let config = config.for_generation(self.num_steps);
                self.strategy = cache::build_strategy(&config, self.num_steps)?;
                self.config = config;
                self.switched = true;
            }
            CacheChange::Reset => {
                self.strategy = cache::build_strategy(&self.config, self.num_steps)?;
                self.reset = true;
            }
        }
        self.strategy_step = 0;
        Ok(())
    }

    /// Runs the next step through the strategy. A libtorch panic (shape error, out of memory…)
    /// becomes an error for this generation only.
    pub fn step(&mut self, pipeline: &dyn AnyPipeline) -> ServiceResult<StepReport> {
        let started = Instant::now();
        let mut stats = StepStats::recording(self.record_modules);
        let (generation, strategy) = (&mut self.generation, self.strategy.as_mut());
        let output = guarded("denoising step", || {
            pipeline.step(generation, strategy, &mut stats)
        })?;
        let elapsed = started.elapsed();
        self.strategy_step += 1;
        let cost = pipeline.step_cost(&self.generation, &stats);
        let t = &mut self.totals;
        t.flops_total += cost.total;
        t.flops_saved += cost.saved;
        if stats.full_compute() {
            t.full_compute_steps += 1;
        }
        Ok(StepReport {
            output,
            stats,
            cost,
            state_bytes: self.strategy.state_bytes(),
            strategy_step: self.strategy_step,
            switched: std::mem::take(&mut self.switched),
            reset: std::mem::take(&mut self.reset),
            elapsed,
        })
    }
}

/// Runs `f`, turning a panic (libtorch reports shape errors and out-of-memory as panics) into a
/// service error for this generation only.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> ServiceResult<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        tracing::error!(%message, "{what} failed");
        if message.contains("out of memory") {
            ServiceError::ResourceExhausted(format!("{what}: out of device memory"))
        } else {
            ServiceError::Internal(format!("{what} failed: {message}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_is_the_saved_share_of_the_estimated_flops() {
        assert_eq!(Totals::default().cache_hit_ratio(), 0.0);
        let t = Totals {
            full_compute_steps: 8,
            flops_total: 4.0e9,
            flops_saved: 1.0e9,
        };
        assert_eq!(t.cache_hit_ratio(), 0.25);
    }
}
