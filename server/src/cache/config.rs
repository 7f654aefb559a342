//! Cache configurations, fully resolved (every diffusers 0.42.1 default filled in) except what
//! depends on the generation (MagCache's `num_inference_steps`), which each generation resolves
//! ([`CacheConfig::for_generation`]). The API layer builds and validates them from the wire
//! (`api/convert/cache.rs`) and reports them back as they are, so clients see the effective values.

/// A timestep window `(min, max)` on the 0..1000 scale; membership is strict on both sides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimestepRange {
    pub min: f32,
    pub max: f32,
}

impl TimestepRange {
    pub const fn new(min: f32, max: f32) -> Self {
        Self { min, max }
    }

    pub fn contains(&self, t: f64) -> bool {
        (self.min as f64) < t && t < (self.max as f64)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PyramidAttentionBroadcastConfig {
    pub spatial_attention_block_skip_range: Option<u32>,
    pub temporal_attention_block_skip_range: Option<u32>,
    pub cross_attention_block_skip_range: Option<u32>,
    pub spatial_attention_timestep_skip_range: TimestepRange,
    pub temporal_attention_timestep_skip_range: TimestepRange,
    pub cross_attention_timestep_skip_range: TimestepRange,
}

/// FasterCache's extrapolation weight `w` (diffusers takes a callback; we take a schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionWeight {
    Constant(f32),
    /// Linear in the step fraction from `start` (first step) to `end` (last step).
    Linear {
        start: f32,
        end: f32,
    },
}

impl AttentionWeight {
    pub fn at(&self, step: usize, num_steps: usize) -> f32 {
        match *self {
            Self::Constant(w) => w,
            Self::Linear { start, end } => {
                let f = if num_steps > 1 {
                    step as f32 / (num_steps - 1) as f32
                } else {
                    0.0
                };
                start + (end - start) * f
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FasterCacheConfig {
    pub spatial_attention_block_skip_range: u32,
    pub temporal_attention_block_skip_range: Option<u32>,
    pub spatial_attention_timestep_skip_range: TimestepRange,
    pub temporal_attention_timestep_skip_range: TimestepRange,
    pub low_frequency_weight_update_timestep_range: TimestepRange,
    pub high_frequency_weight_update_timestep_range: TimestepRange,
    pub alpha_low_frequency: f32,
    pub alpha_high_frequency: f32,
    pub unconditional_batch_skip_range: u32,
    pub unconditional_batch_timestep_skip_range: TimestepRange,
    pub attention_weight: AttentionWeight,
    pub is_guidance_distilled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorDtype {
    BFloat16,
    Float16,
    Float32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaylorSeerConfig {
    pub cache_interval: u32,
    pub disable_cache_before_step: u32,
    pub disable_cache_after_step: Option<u32>,
    pub max_order: u32,
    pub taylor_factors_dtype: FactorDtype,
    pub skip_predict_identifiers: Vec<String>,
    pub cache_identifiers: Vec<String>,
    pub use_lite_mode: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FirstBlockCacheConfig {
    pub threshold: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MagCacheConfig {
    pub threshold: f32,
    pub max_skip_steps: u32,
    pub retention_ratio: f32,
    /// The step count `mag_ratios` are resampled to and after which the state resets. Unset:
    /// the step count of the generation the strategy runs in (diffusers' constructor defaults to
    /// 28 whatever the generation); resolved per generation by [`CacheConfig::for_generation`].
    pub num_inference_steps: Option<u32>,
    pub mag_ratios: Vec<f32>,
    pub calibrate: bool,
}

impl MagCacheConfig {
    /// `num_inference_steps` in a generation of `num_steps` steps.
    pub fn inference_steps(&self, num_steps: usize) -> usize {
        self.num_inference_steps.map_or(num_steps, |n| n as usize)
    }
}

/// A validated cache strategy with every default resolved.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum CacheConfig {
    #[default]
    None,
    PyramidAttentionBroadcast(PyramidAttentionBroadcastConfig),
    FasterCache(FasterCacheConfig),
    TaylorSeer(TaylorSeerConfig),
    FirstBlockCache(FirstBlockCacheConfig),
    MagCache(MagCacheConfig),
}

/// The strategies this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheKind {
    None,
    PyramidAttentionBroadcast,
    FasterCache,
    TaylorSeer,
    FirstBlockCache,
    MagCache,
}

impl CacheKind {
    /// Every strategy, in API order.
    pub const ALL: [CacheKind; 6] = [
        Self::None,
        Self::PyramidAttentionBroadcast,
        Self::FasterCache,
        Self::TaylorSeer,
        Self::FirstBlockCache,
        Self::MagCache,
    ];

    /// A short name for logs and spans.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::PyramidAttentionBroadcast => "pyramid_attention_broadcast",
            Self::FasterCache => "faster_cache",
            Self::TaylorSeer => "taylor_seer",
            Self::FirstBlockCache => "first_block_cache",
            Self::MagCache => "mag_cache",
        }
    }
}

impl CacheConfig {
    /// This config as a generation of `num_steps` steps runs it (and reports it): the defaults
    /// that depend on the generation filled in.
    pub fn for_generation(mut self, num_steps: usize) -> Self {
        if let Self::MagCache(c) = &mut self {
            c.num_inference_steps = Some(c.inference_steps(num_steps) as u32);
        }
        self
    }

    pub fn kind(&self) -> CacheKind {
        match self {
            Self::None => CacheKind::None,
            Self::PyramidAttentionBroadcast(_) => CacheKind::PyramidAttentionBroadcast,
            Self::FasterCache(_) => CacheKind::FasterCache,
            Self::TaylorSeer(_) => CacheKind::TaylorSeer,
            Self::FirstBlockCache(_) => CacheKind::FirstBlockCache,
            Self::MagCache(_) => CacheKind::MagCache,
        }
    }
}
