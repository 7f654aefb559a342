//! Cache strategies: typed configs mirroring diffusers' cache configs, with proto conversions and
//! a compact string syntax (see [`CacheConfig::parse`]).

mod syntax;

use std::fmt;
use std::ops::Range;

use denoised_proto::v1;

pub use syntax::ParseCacheConfigError;

/// A step-cache strategy for a session or a one-shot generation.
///
/// Every `Option` field left at `None` (and every empty list) means "the server default", which
/// follows diffusers 0.42.1. Build one from a config struct (`TaylorSeerCacheConfig { .. }.into()`)
/// or parse the string syntax:
///
/// ```
/// use denoised_client::CacheConfig;
/// let cache: CacheConfig = "taylorseer:cache_interval=5,max_order=1".parse().unwrap();
/// assert_eq!(cache.to_string(), "taylorseer:cache_interval=5,max_order=1");
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub enum CacheConfig {
    /// No caching: every step computes every block.
    #[default]
    None,
    /// Pyramid Attention Broadcast (`pab`).
    PyramidAttentionBroadcast(PyramidAttentionBroadcastConfig),
    /// FasterCache (`fastercache`).
    FasterCache(FasterCacheConfig),
    /// TaylorSeer (`taylorseer`).
    TaylorSeer(TaylorSeerCacheConfig),
    /// First Block Cache (`fbc`).
    FirstBlockCache(FirstBlockCacheConfig),
    /// MagCache (`magcache`).
    MagCache(MagCacheConfig),
}

/// Pyramid Attention Broadcast: reuse attention outputs every N-th call inside a timestep range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PyramidAttentionBroadcastConfig {
    /// Recompute spatial self-attention every N-th call (default 2 when all skip ranges are unset).
    pub spatial_attention_block_skip_range: Option<u32>,
    /// Recompute temporal attention every N-th call.
    pub temporal_attention_block_skip_range: Option<u32>,
    /// Recompute cross-attention every N-th call.
    pub cross_attention_block_skip_range: Option<u32>,
    /// Reuse spatial attention only while `start < timestep < end` (0..1000 scale; default 100..800).
    pub spatial_attention_timestep_skip_range: Option<Range<f32>>,
    /// Timestep range for temporal attention reuse.
    pub temporal_attention_timestep_skip_range: Option<Range<f32>>,
    /// Timestep range for cross-attention reuse.
    pub cross_attention_timestep_skip_range: Option<Range<f32>>,
}

/// FasterCache: attention reuse with frequency-aware extrapolation and unconditional-branch skipping.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FasterCacheConfig {
    /// Recompute spatial attention every N-th call.
    pub spatial_attention_block_skip_range: Option<u32>,
    /// Recompute temporal attention every N-th call.
    pub temporal_attention_block_skip_range: Option<u32>,
    /// Reuse spatial attention only inside this timestep range.
    pub spatial_attention_timestep_skip_range: Option<Range<f32>>,
    /// Reuse temporal attention only inside this timestep range.
    pub temporal_attention_timestep_skip_range: Option<Range<f32>>,
    /// Timestep range where the low-frequency weight is updated.
    pub low_frequency_weight_update_timestep_range: Option<Range<f32>>,
    /// Timestep range where the high-frequency weight is updated.
    pub high_frequency_weight_update_timestep_range: Option<Range<f32>>,
    /// Low-frequency scaling factor.
    pub alpha_low_frequency: Option<f32>,
    /// High-frequency scaling factor.
    pub alpha_high_frequency: Option<f32>,
    /// Compute the unconditional branch every N-th step.
    pub unconditional_batch_skip_range: Option<u32>,
    /// Skip the unconditional branch only inside this timestep range.
    pub unconditional_batch_timestep_skip_range: Option<Range<f32>>,
    /// Weight schedule of the attention extrapolation (diffusers' callback; default constant 0.5).
    pub attention_weight: Option<AttentionWeight>,
    /// True for guidance-distilled models such as FLUX.1-dev: no unconditional-branch skipping.
    pub is_guidance_distilled: Option<bool>,
}

/// FasterCache's attention extrapolation weight over the denoising steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionWeight {
    /// The same weight at every step.
    Constant(f32),
    /// Linear in the step fraction, from `start` at the first step to `end` at the last.
    Linear {
        /// Weight at the first step.
        start: f32,
        /// Weight at the last step.
        end: f32,
    },
}

/// TaylorSeer: predict block outputs with a Taylor expansion between full computations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaylorSeerCacheConfig {
    /// Compute fully every N-th step; predict in between.
    pub cache_interval: Option<u32>,
    /// Compute fully before this step (warm-up).
    pub disable_cache_before_step: Option<u32>,
    /// Compute fully from this step on.
    pub disable_cache_after_step: Option<u32>,
    /// Order of the Taylor expansion.
    pub max_order: Option<u32>,
    /// Dtype in which the Taylor factors are stored.
    pub taylor_factors_dtype: Option<FactorDtype>,
    /// Module-name patterns (full match) that output zeros on predicted steps.
    pub skip_predict_identifiers: Vec<String>,
    /// Module-name patterns (full match) that are predicted. Empty: all block attentions.
    pub cache_identifiers: Vec<String>,
    /// diffusers' lite mode (predict whole blocks, fewer stored factors).
    pub use_lite_mode: Option<bool>,
}

/// Storage dtype of TaylorSeer's factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FactorDtype {
    /// `torch.bfloat16`.
    Bfloat16,
    /// `torch.float16`.
    Float16,
    /// `torch.float32`.
    Float32,
}

impl FactorDtype {
    /// The torch dtype name, as used in the string syntax.
    pub fn name(self) -> &'static str {
        match self {
            FactorDtype::Bfloat16 => "bfloat16",
            FactorDtype::Float16 => "float16",
            FactorDtype::Float32 => "float32",
        }
    }

    fn from_proto(value: i32) -> Option<Self> {
        match v1::FactorDtype::try_from(value).ok()? {
            v1::FactorDtype::Unspecified => None,
            v1::FactorDtype::Bfloat16 => Some(FactorDtype::Bfloat16),
            v1::FactorDtype::Float16 => Some(FactorDtype::Float16),
            v1::FactorDtype::Float32 => Some(FactorDtype::Float32),
        }
    }

    fn into_proto(dtype: Option<Self>) -> v1::FactorDtype {
        match dtype {
            None => v1::FactorDtype::Unspecified,
            Some(FactorDtype::Bfloat16) => v1::FactorDtype::Bfloat16,
            Some(FactorDtype::Float16) => v1::FactorDtype::Float16,
            Some(FactorDtype::Float32) => v1::FactorDtype::Float32,
        }
    }
}

impl fmt::Display for FactorDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// First Block Cache: skip the remaining blocks while the first block's residual barely changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FirstBlockCacheConfig {
    /// Relative-change threshold below which the cached residual is reused.
    pub threshold: Option<f32>,
}

/// MagCache: skip steps while the accumulated magnitude-ratio error stays under a threshold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MagCacheConfig {
    /// Accumulated error threshold.
    pub threshold: Option<f32>,
    /// Most consecutive skipped steps.
    pub max_skip_steps: Option<u32>,
    /// Fraction of initial steps that always compute.
    pub retention_ratio: Option<f32>,
    /// Step count the ratios are resampled to (unset: the generation's).
    pub num_inference_steps: Option<u32>,
    /// Per-step magnitude ratios (resampled to the step count). Required unless `calibrate`.
    pub mag_ratios: Vec<f32>,
    /// Never skip; record the ratios and return them in `Completed::calibrated_mag_ratios`.
    pub calibrate: bool,
}

/// Which strategy a [`CacheConfig`] or a step's [`CacheActivity`](crate::CacheActivity) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheKind {
    /// Not set by the server (or a kind newer than this client).
    Unspecified,
    /// No caching.
    None,
    /// Pyramid Attention Broadcast.
    PyramidAttentionBroadcast,
    /// FasterCache.
    FasterCache,
    /// TaylorSeer.
    TaylorSeer,
    /// First Block Cache.
    FirstBlockCache,
    /// MagCache.
    MagCache,
}

impl CacheKind {
    /// The short name used by the string syntax (`none`, `pab`, `fastercache`, `taylorseer`,
    /// `fbc`, `magcache`).
    pub fn name(self) -> &'static str {
        match self {
            CacheKind::Unspecified => "unspecified",
            CacheKind::None => "none",
            CacheKind::PyramidAttentionBroadcast => "pab",
            CacheKind::FasterCache => "fastercache",
            CacheKind::TaylorSeer => "taylorseer",
            CacheKind::FirstBlockCache => "fbc",
            CacheKind::MagCache => "magcache",
        }
    }

    /// Converts a proto enum value; unknown values become [`CacheKind::Unspecified`].
    pub fn from_proto(value: i32) -> Self {
        match v1::CacheKind::try_from(value) {
            Ok(v1::CacheKind::None) => CacheKind::None,
            Ok(v1::CacheKind::PyramidAttentionBroadcast) => CacheKind::PyramidAttentionBroadcast,
            Ok(v1::CacheKind::FasterCache) => CacheKind::FasterCache,
            Ok(v1::CacheKind::TaylorSeer) => CacheKind::TaylorSeer,
            Ok(v1::CacheKind::FirstBlockCache) => CacheKind::FirstBlockCache,
            Ok(v1::CacheKind::MagCache) => CacheKind::MagCache,
            Ok(v1::CacheKind::Unspecified) | Err(_) => CacheKind::Unspecified,
        }
    }

    /// The proto enum value.
    pub fn into_proto(self) -> v1::CacheKind {
        match self {
            CacheKind::Unspecified => v1::CacheKind::Unspecified,
            CacheKind::None => v1::CacheKind::None,
            CacheKind::PyramidAttentionBroadcast => v1::CacheKind::PyramidAttentionBroadcast,
            CacheKind::FasterCache => v1::CacheKind::FasterCache,
            CacheKind::TaylorSeer => v1::CacheKind::TaylorSeer,
            CacheKind::FirstBlockCache => v1::CacheKind::FirstBlockCache,
            CacheKind::MagCache => v1::CacheKind::MagCache,
        }
    }
}

impl fmt::Display for CacheKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl CacheConfig {
    /// The strategy of this config.
    pub fn kind(&self) -> CacheKind {
        match self {
            CacheConfig::None => CacheKind::None,
            CacheConfig::PyramidAttentionBroadcast(_) => CacheKind::PyramidAttentionBroadcast,
            CacheConfig::FasterCache(_) => CacheKind::FasterCache,
            CacheConfig::TaylorSeer(_) => CacheKind::TaylorSeer,
            CacheConfig::FirstBlockCache(_) => CacheKind::FirstBlockCache,
            CacheConfig::MagCache(_) => CacheKind::MagCache,
        }
    }

    /// Parses the string syntax `strategy[:key=value,...]`, e.g.
    /// `taylorseer:cache_interval=5,max_order=1`, `fbc:threshold=0.12`, `pab:spatial_range=100..800`
    /// or `magcache:threshold=0.06,mag_ratios=1.0/1.02/0.98`.
    ///
    /// - Strategies: `none`, `pab`, `fastercache`, `taylorseer`, `fbc` (`first-block-cache`),
    ///   `magcache`; full names such as `pyramid_attention_broadcast` work too (case, `-` and `_`
    ///   are ignored).
    /// - Keys: the diffusers field names, or short forms (`interval`, `order`, `before`,
    ///   `after`, `spatial`, `spatial_range`, `ratios`, ...); `-` may replace `_`.
    /// - Values: integers, numbers, booleans (`true`/`false`; a bare key means `true`),
    ///   ranges `100..800`, lists separated by `/` (`1.0/1.2/1.1`), dtypes `bf16`/`fp16`/`fp32`.
    ///   FasterCache's `attention_weight` is a number (constant) or `start..end` (linear).
    ///   A list item or value may be double-quoted to contain `,`, `/` or `=`.
    ///
    /// [`Display`](fmt::Display) prints the same syntax with the full key names; parsing it
    /// gives back an equal config.
    pub fn parse(input: &str) -> Result<Self, ParseCacheConfigError> {
        syntax::parse(input)
    }

    /// The proto message, for use with the raw generated client.
    pub fn into_proto(self) -> v1::CacheConfig {
        self.into()
    }
}

impl std::str::FromStr for CacheConfig {
    type Err = ParseCacheConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CacheConfig::parse(s)
    }
}

impl fmt::Display for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        syntax::fmt(self, f)
    }
}

macro_rules! impl_from_config {
    ($($config:ident => $variant:ident),* $(,)?) => {$(
        impl From<$config> for CacheConfig {
            fn from(config: $config) -> Self {
                CacheConfig::$variant(config)
            }
        }
    )*};
}

impl_from_config! {
    PyramidAttentionBroadcastConfig => PyramidAttentionBroadcast,
    FasterCacheConfig => FasterCache,
    TaylorSeerCacheConfig => TaylorSeer,
    FirstBlockCacheConfig => FirstBlockCache,
    MagCacheConfig => MagCache,
}

// ---------------------------------------------------------------------------------------------
// Proto conversions

fn range_to_proto(range: Range<f32>) -> v1::FloatRange {
    v1::FloatRange {
        min: range.start,
        max: range.end,
    }
}

fn range_from_proto(range: v1::FloatRange) -> Range<f32> {
    range.min..range.max
}

fn opt_range_to_proto(range: Option<Range<f32>>) -> Option<v1::FloatRange> {
    range.map(range_to_proto)
}

fn opt_range_from_proto(range: Option<v1::FloatRange>) -> Option<Range<f32>> {
    range.map(range_from_proto)
}

impl From<AttentionWeight> for v1::AttentionWeight {
    fn from(weight: AttentionWeight) -> Self {
        use v1::attention_weight::Weight;
        let weight = match weight {
            AttentionWeight::Constant(w) => Weight::Constant(w),
            AttentionWeight::Linear { start, end } => Weight::Linear(range_to_proto(start..end)),
        };
        v1::AttentionWeight {
            weight: Some(weight),
        }
    }
}

impl AttentionWeight {
    fn from_proto(weight: v1::AttentionWeight) -> Option<Self> {
        use v1::attention_weight::Weight;
        Some(match weight.weight? {
            Weight::Constant(w) => AttentionWeight::Constant(w),
            Weight::Linear(r) => AttentionWeight::Linear {
                start: r.min,
                end: r.max,
            },
        })
    }
}

impl From<CacheConfig> for v1::CacheConfig {
    fn from(config: CacheConfig) -> Self {
        use v1::cache_config::Strategy;
        let strategy = match config {
            CacheConfig::None => Strategy::None(v1::NoCache {}),
            CacheConfig::PyramidAttentionBroadcast(c) => {
                Strategy::PyramidAttentionBroadcast(v1::PyramidAttentionBroadcast {
                    spatial_attention_block_skip_range: c.spatial_attention_block_skip_range,
                    temporal_attention_block_skip_range: c.temporal_attention_block_skip_range,
                    cross_attention_block_skip_range: c.cross_attention_block_skip_range,
                    spatial_attention_timestep_skip_range: opt_range_to_proto(
                        c.spatial_attention_timestep_skip_range,
                    ),
                    temporal_attention_timestep_skip_range: opt_range_to_proto(
                        c.temporal_attention_timestep_skip_range,
                    ),
                    cross_attention_timestep_skip_range: opt_range_to_proto(
                        c.cross_attention_timestep_skip_range,
                    ),
                })
            }
            CacheConfig::FasterCache(c) => Strategy::FasterCache(v1::FasterCache {
                spatial_attention_block_skip_range: c.spatial_attention_block_skip_range,
                temporal_attention_block_skip_range: c.temporal_attention_block_skip_range,
                spatial_attention_timestep_skip_range: opt_range_to_proto(
                    c.spatial_attention_timestep_skip_range,
                ),
                temporal_attention_timestep_skip_range: opt_range_to_proto(
                    c.temporal_attention_timestep_skip_range,
                ),
                low_frequency_weight_update_timestep_range: opt_range_to_proto(
                    c.low_frequency_weight_update_timestep_range,
                ),
                high_frequency_weight_update_timestep_range: opt_range_to_proto(
                    c.high_frequency_weight_update_timestep_range,
                ),
                alpha_low_frequency: c.alpha_low_frequency,
                alpha_high_frequency: c.alpha_high_frequency,
                unconditional_batch_skip_range: c.unconditional_batch_skip_range,
                unconditional_batch_timestep_skip_range: opt_range_to_proto(
                    c.unconditional_batch_timestep_skip_range,
                ),
                attention_weight: c.attention_weight.map(Into::into),
                is_guidance_distilled: c.is_guidance_distilled,
            }),
            CacheConfig::TaylorSeer(c) => Strategy::TaylorSeer(v1::TaylorSeer {
                cache_interval: c.cache_interval,
                disable_cache_before_step: c.disable_cache_before_step,
                disable_cache_after_step: c.disable_cache_after_step,
                max_order: c.max_order,
                taylor_factors_dtype: FactorDtype::into_proto(c.taylor_factors_dtype).into(),
                skip_predict_identifiers: c.skip_predict_identifiers,
                cache_identifiers: c.cache_identifiers,
                use_lite_mode: c.use_lite_mode,
            }),
            CacheConfig::FirstBlockCache(c) => Strategy::FirstBlockCache(v1::FirstBlockCache {
                threshold: c.threshold,
            }),
            CacheConfig::MagCache(c) => Strategy::MagCache(v1::MagCache {
                threshold: c.threshold,
                max_skip_steps: c.max_skip_steps,
                retention_ratio: c.retention_ratio,
                num_inference_steps: c.num_inference_steps,
                mag_ratios: c.mag_ratios,
                calibrate: c.calibrate,
            }),
        };
        v1::CacheConfig {
            strategy: Some(strategy),
        }
    }
}

/// An unset `strategy` oneof means no cache, as documented for `CreateSessionRequest.cache`.
impl From<v1::CacheConfig> for CacheConfig {
    fn from(config: v1::CacheConfig) -> Self {
        use v1::cache_config::Strategy;
        match config.strategy {
            None | Some(Strategy::None(_)) => CacheConfig::None,
            Some(Strategy::PyramidAttentionBroadcast(c)) => {
                CacheConfig::PyramidAttentionBroadcast(PyramidAttentionBroadcastConfig {
                    spatial_attention_block_skip_range: c.spatial_attention_block_skip_range,
                    temporal_attention_block_skip_range: c.temporal_attention_block_skip_range,
                    cross_attention_block_skip_range: c.cross_attention_block_skip_range,
                    spatial_attention_timestep_skip_range: opt_range_from_proto(
                        c.spatial_attention_timestep_skip_range,
                    ),
                    temporal_attention_timestep_skip_range: opt_range_from_proto(
                        c.temporal_attention_timestep_skip_range,
                    ),
                    cross_attention_timestep_skip_range: opt_range_from_proto(
                        c.cross_attention_timestep_skip_range,
                    ),
                })
            }
            Some(Strategy::FasterCache(c)) => CacheConfig::FasterCache(FasterCacheConfig {
                spatial_attention_block_skip_range: c.spatial_attention_block_skip_range,
                temporal_attention_block_skip_range: c.temporal_attention_block_skip_range,
                spatial_attention_timestep_skip_range: opt_range_from_proto(
                    c.spatial_attention_timestep_skip_range,
                ),
                temporal_attention_timestep_skip_range: opt_range_from_proto(
                    c.temporal_attention_timestep_skip_range,
                ),
                low_frequency_weight_update_timestep_range: opt_range_from_proto(
                    c.low_frequency_weight_update_timestep_range,
                ),
                high_frequency_weight_update_timestep_range: opt_range_from_proto(
                    c.high_frequency_weight_update_timestep_range,
                ),
                alpha_low_frequency: c.alpha_low_frequency,
                alpha_high_frequency: c.alpha_high_frequency,
                unconditional_batch_skip_range: c.unconditional_batch_skip_range,
                unconditional_batch_timestep_skip_range: opt_range_from_proto(
                    c.unconditional_batch_timestep_skip_range,
                ),
                attention_weight: c.attention_weight.and_then(AttentionWeight::from_proto),
                is_guidance_distilled: c.is_guidance_distilled,
            }),
            Some(Strategy::TaylorSeer(c)) => CacheConfig::TaylorSeer(TaylorSeerCacheConfig {
                cache_interval: c.cache_interval,
                disable_cache_before_step: c.disable_cache_before_step,
                disable_cache_after_step: c.disable_cache_after_step,
                max_order: c.max_order,
                taylor_factors_dtype: FactorDtype::from_proto(c.taylor_factors_dtype),
                skip_predict_identifiers: c.skip_predict_identifiers,
                cache_identifiers: c.cache_identifiers,
                use_lite_mode: c.use_lite_mode,
            }),
            Some(Strategy::FirstBlockCache(c)) => {
                CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
                    threshold: c.threshold,
                })
            }
            Some(Strategy::MagCache(c)) => CacheConfig::MagCache(MagCacheConfig {
                threshold: c.threshold,
                max_skip_steps: c.max_skip_steps,
                retention_ratio: c.retention_ratio,
                num_inference_steps: c.num_inference_steps,
                mag_ratios: c.mag_ratios,
                calibrate: c.calibrate,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One fully populated config per strategy, plus the empty ones.
    pub(super) fn samples() -> Vec<CacheConfig> {
        vec![
            CacheConfig::None,
            PyramidAttentionBroadcastConfig::default().into(),
            PyramidAttentionBroadcastConfig {
                spatial_attention_block_skip_range: Some(2),
                temporal_attention_block_skip_range: Some(3),
                cross_attention_block_skip_range: Some(4),
                spatial_attention_timestep_skip_range: Some(100.0..800.0),
                temporal_attention_timestep_skip_range: Some(150.5..750.25),
                cross_attention_timestep_skip_range: Some(0.0..1000.0),
            }
            .into(),
            FasterCacheConfig::default().into(),
            FasterCacheConfig {
                spatial_attention_block_skip_range: Some(2),
                temporal_attention_block_skip_range: Some(5),
                spatial_attention_timestep_skip_range: Some(-1.0..681.0),
                temporal_attention_timestep_skip_range: Some(-1.0..681.0),
                low_frequency_weight_update_timestep_range: Some(99.0..901.0),
                high_frequency_weight_update_timestep_range: Some(-1.0..301.0),
                alpha_low_frequency: Some(1.1),
                alpha_high_frequency: Some(1.1),
                unconditional_batch_skip_range: Some(5),
                unconditional_batch_timestep_skip_range: Some(-1.0..641.0),
                attention_weight: Some(AttentionWeight::Linear {
                    start: 0.3,
                    end: 0.7,
                }),
                is_guidance_distilled: Some(true),
            }
            .into(),
            FasterCacheConfig {
                attention_weight: Some(AttentionWeight::Constant(0.5)),
                is_guidance_distilled: Some(false),
                ..Default::default()
            }
            .into(),
            TaylorSeerCacheConfig::default().into(),
            TaylorSeerCacheConfig {
                cache_interval: Some(5),
                disable_cache_before_step: Some(3),
                disable_cache_after_step: Some(45),
                max_order: Some(1),
                taylor_factors_dtype: Some(FactorDtype::Float32),
                skip_predict_identifiers: vec![r"proj_out".into(), r"norm\d+".into()],
                cache_identifiers: vec![
                    r"transformer_blocks\.\d+\.attn".into(),
                    r"single_transformer_blocks\.\d{1,2}\.attn".into(),
                ],
                use_lite_mode: Some(true),
            }
            .into(),
            FirstBlockCacheConfig::default().into(),
            FirstBlockCacheConfig {
                threshold: Some(0.12),
            }
            .into(),
            MagCacheConfig::default().into(),
            MagCacheConfig {
                threshold: Some(0.06),
                max_skip_steps: Some(3),
                retention_ratio: Some(0.2),
                num_inference_steps: Some(28),
                mag_ratios: vec![1.0, 1.02, 0.98, 0.9],
                calibrate: false,
            }
            .into(),
            MagCacheConfig {
                calibrate: true,
                ..Default::default()
            }
            .into(),
        ]
    }

    #[test]
    fn proto_round_trip_of_every_variant() {
        for config in samples() {
            let proto = config.clone().into_proto();
            assert!(proto.strategy.is_some(), "{config:?}");
            assert_eq!(CacheConfig::from(proto), config);
        }
    }

    #[test]
    fn proto_fields_match_diffusers_names() {
        use v1::cache_config::Strategy;
        let config: CacheConfig = TaylorSeerCacheConfig {
            cache_interval: Some(5),
            max_order: Some(1),
            taylor_factors_dtype: Some(FactorDtype::Bfloat16),
            ..Default::default()
        }
        .into();
        let Some(Strategy::TaylorSeer(t)) = config.into_proto().strategy else {
            panic!("not taylorseer");
        };
        assert_eq!(t.cache_interval, Some(5));
        assert_eq!(t.max_order, Some(1));
        assert_eq!(t.disable_cache_before_step, None);
        assert_eq!(t.taylor_factors_dtype, v1::FactorDtype::Bfloat16 as i32);

        let none = CacheConfig::None.into_proto();
        assert_eq!(none.strategy, Some(Strategy::None(v1::NoCache {})));
    }

    #[test]
    fn unset_strategy_means_no_cache() {
        assert_eq!(
            CacheConfig::from(v1::CacheConfig { strategy: None }),
            CacheConfig::None
        );
    }

    #[test]
    fn cache_kind_matches_config_and_proto() {
        for config in samples() {
            let kind = config.kind();
            assert_eq!(CacheKind::from_proto(kind.into_proto() as i32), kind);
            assert!(config.to_string().starts_with(kind.name()));
        }
        assert_eq!(CacheKind::from_proto(99), CacheKind::Unspecified);
    }
}
