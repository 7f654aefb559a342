//! The `strategy:key=value,...` string syntax of [`CacheConfig`].

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use super::{
    AttentionWeight, CacheConfig, FactorDtype, FasterCacheConfig, FirstBlockCacheConfig,
    MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig,
};

/// Why a cache config string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseCacheConfigError {
    input: String,
    message: String,
}

impl ParseCacheConfigError {
    /// What is wrong, without the input.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ParseCacheConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid cache config {:?}: {}", self.input, self.message)
    }
}

impl std::error::Error for ParseCacheConfigError {}

impl From<ParseCacheConfigError> for crate::Error {
    fn from(err: ParseCacheConfigError) -> Self {
        crate::Error::InvalidArgument(err.to_string())
    }
}

const STRATEGIES: &str = "none, pab, fastercache, taylorseer, fbc, magcache";

pub(super) fn parse(input: &str) -> Result<CacheConfig, ParseCacheConfigError> {
    parse_inner(input).map_err(|message| ParseCacheConfigError {
        input: input.to_owned(),
        message,
    })
}

fn parse_inner(input: &str) -> Result<CacheConfig, String> {
    let input = input.trim();
    if input.is_empty() {
        return Err(format!(
            "empty; expected a strategy ({STRATEGIES}), e.g. \"taylorseer:cache_interval=5,max_order=1\""
        ));
    }
    let (name, params) = match input.split_once(':') {
        Some((name, params)) => (name.trim(), params),
        None => (input, ""),
    };
    // Case, '-' and '_' are ignored so that `FirstBlockCache`, `first-block-cache` and `fbc` agree.
    let normalized: String = name
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Ok(match normalized.as_str() {
        "none" | "off" => {
            if !params.trim().is_empty() {
                return Err("strategy \"none\" takes no parameters".into());
            }
            CacheConfig::None
        }
        "pab" | "pyramidattentionbroadcast" => {
            CacheConfig::PyramidAttentionBroadcast(parse_fields(params)?)
        }
        "fastercache" | "faster" => CacheConfig::FasterCache(parse_fields(params)?),
        "taylorseer" | "taylor" => CacheConfig::TaylorSeer(parse_fields(params)?),
        "fbc" | "firstblockcache" | "firstblock" => {
            CacheConfig::FirstBlockCache(parse_fields(params)?)
        }
        "magcache" | "mag" => CacheConfig::MagCache(parse_fields(params)?),
        _ => {
            return Err(format!(
                "unknown cache strategy {name:?} (expected one of: {STRATEGIES})"
            ))
        }
    })
}

pub(super) fn fmt(config: &CacheConfig, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str(config.kind().name())?;
    match config {
        CacheConfig::None => Ok(()),
        CacheConfig::PyramidAttentionBroadcast(c) => fmt_fields(c, f),
        CacheConfig::FasterCache(c) => fmt_fields(c, f),
        CacheConfig::TaylorSeer(c) => fmt_fields(c, f),
        CacheConfig::FirstBlockCache(c) => fmt_fields(c, f),
        CacheConfig::MagCache(c) => fmt_fields(c, f),
    }
}

// ---------------------------------------------------------------------------------------------
// Per-config field tables

/// A config struct whose fields can be set and printed by key.
trait Fields: Default {
    /// Canonical (diffusers) key names with their short aliases, in display order.
    const KEYS: &'static [(&'static str, &'static [&'static str])];
    fn field_mut(&mut self, key: &str) -> &mut dyn Field;
    fn field(&self, key: &str) -> &dyn Field;
}

macro_rules! fields {
    ($ty:ty { $($field:ident [$($alias:literal),*]),* $(,)? }) => {
        impl Fields for $ty {
            const KEYS: &'static [(&'static str, &'static [&'static str])] =
                &[$((stringify!($field), &[$($alias),*])),*];

            fn field_mut(&mut self, key: &str) -> &mut dyn Field {
                match key {
                    $(stringify!($field) => &mut self.$field,)*
                    _ => unreachable!("{key} is not in KEYS"),
                }
            }

            fn field(&self, key: &str) -> &dyn Field {
                match key {
                    $(stringify!($field) => &self.$field,)*
                    _ => unreachable!("{key} is not in KEYS"),
                }
            }
        }
    };
}

fields!(PyramidAttentionBroadcastConfig {
    spatial_attention_block_skip_range["spatial", "spatial_skip"],
    temporal_attention_block_skip_range["temporal", "temporal_skip"],
    cross_attention_block_skip_range["cross", "cross_skip"],
    spatial_attention_timestep_skip_range["spatial_range", "spatial_timesteps"],
    temporal_attention_timestep_skip_range["temporal_range", "temporal_timesteps"],
    cross_attention_timestep_skip_range["cross_range", "cross_timesteps"],
});

fields!(FasterCacheConfig {
    spatial_attention_block_skip_range["spatial", "spatial_skip"],
    temporal_attention_block_skip_range["temporal", "temporal_skip"],
    spatial_attention_timestep_skip_range["spatial_range", "spatial_timesteps"],
    temporal_attention_timestep_skip_range["temporal_range", "temporal_timesteps"],
    low_frequency_weight_update_timestep_range["low_freq_range", "low_range"],
    high_frequency_weight_update_timestep_range["high_freq_range", "high_range"],
    alpha_low_frequency["alpha_low"],
    alpha_high_frequency["alpha_high"],
    unconditional_batch_skip_range["uncond_skip"],
    unconditional_batch_timestep_skip_range["uncond_range"],
    attention_weight["weight"],
    is_guidance_distilled["guidance_distilled", "distilled"],
});

fields!(TaylorSeerCacheConfig {
    cache_interval["interval"],
    disable_cache_before_step["before"],
    disable_cache_after_step["after"],
    max_order["order"],
    taylor_factors_dtype["dtype", "factors_dtype"],
    skip_predict_identifiers["skip_predict"],
    cache_identifiers["identifiers"],
    use_lite_mode["lite", "lite_mode"],
});

fields!(FirstBlockCacheConfig {
    threshold["thresh"],
});

fields!(MagCacheConfig {
    threshold["thresh"],
    max_skip_steps["max_skip"],
    retention_ratio["retention"],
    num_inference_steps["steps", "num_steps"],
    mag_ratios["ratios"],
    calibrate[],
});

fn parse_fields<T: Fields>(params: &str) -> Result<T, String> {
    let mut config = T::default();
    let mut seen = HashSet::new();
    for item in split_unquoted(params, ',')? {
        let item = item.trim();
        // Tolerates a trailing comma or `name:` with nothing after it.
        if item.is_empty() {
            continue;
        }
        let (key, value) = match find_unquoted(item, '=') {
            Some(at) => (item[..at].trim(), Some(item[at + 1..].trim())),
            None => (item, None),
        };
        let key = canonical_key::<T>(key)?;
        if !seen.insert(key) {
            return Err(format!("{key} is given more than once"));
        }
        config
            .field_mut(key)
            .set(value)
            .map_err(|message| format!("{key}: {message}"))?;
    }
    Ok(config)
}

fn canonical_key<T: Fields>(key: &str) -> Result<&'static str, String> {
    let normalized = key.to_ascii_lowercase().replace('-', "_");
    T::KEYS
        .iter()
        .find(|(name, aliases)| *name == normalized || aliases.contains(&normalized.as_str()))
        .map(|(name, _)| *name)
        .ok_or_else(|| {
            let expected: Vec<String> = T::KEYS
                .iter()
                .map(|(name, aliases)| match aliases {
                    [] => (*name).to_owned(),
                    _ => format!("{name} ({})", aliases.join(", ")),
                })
                .collect();
            format!(
                "unknown key {key:?} (expected one of: {})",
                expected.join(", ")
            )
        })
}

fn fmt_fields<T: Fields>(config: &T, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut separator = ":";
    for (key, _) in T::KEYS {
        if let Some(value) = config.field(key).show() {
            write!(f, "{separator}{key}={value}")?;
            separator = ",";
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Values

/// A config field: `set` parses a value (`None` for a bare key), `show` prints it (`None` when
/// it holds the server default and is left out).
trait Field {
    fn set(&mut self, value: Option<&str>) -> Result<(), String>;
    fn show(&self) -> Option<String>;
}

/// A single value inside an `Option` field or a `/`-separated list.
trait Scalar: Sized {
    fn parse(s: &str) -> Result<Self, String>;
    fn show(&self) -> String;
    /// The value of a bare key, if the type has one.
    fn bare() -> Option<Self> {
        None
    }
}

impl<T: Scalar> Field for Option<T> {
    fn set(&mut self, value: Option<&str>) -> Result<(), String> {
        *self = Some(match value {
            Some(value) => T::parse(value)?,
            None => T::bare().ok_or("needs a value (key=value)")?,
        });
        Ok(())
    }

    fn show(&self) -> Option<String> {
        self.as_ref().map(Scalar::show)
    }
}

impl<T: Scalar> Field for Vec<T> {
    fn set(&mut self, value: Option<&str>) -> Result<(), String> {
        let value = value.ok_or("needs a list of values separated by '/'")?;
        if value.is_empty() {
            return Err("needs at least one value (items are separated by '/')".into());
        }
        *self = split_unquoted(value, '/')?
            .into_iter()
            .map(|item| T::parse(item.trim()))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    fn show(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.iter().map(Scalar::show).collect::<Vec<_>>().join("/"))
    }
}

/// A plain `bool` field (MagCache's `calibrate`): `false` is the default and is left out.
impl Field for bool {
    fn set(&mut self, value: Option<&str>) -> Result<(), String> {
        *self = value.map_or(Ok(true), <bool as Scalar>::parse)?;
        Ok(())
    }

    fn show(&self) -> Option<String> {
        self.then(|| "true".to_owned())
    }
}

impl Scalar for u32 {
    fn parse(s: &str) -> Result<Self, String> {
        s.parse()
            .map_err(|_| format!("expected a non-negative integer, got {s:?}"))
    }

    fn show(&self) -> String {
        self.to_string()
    }
}

impl Scalar for f32 {
    fn parse(s: &str) -> Result<Self, String> {
        let v: f32 = s
            .parse()
            .map_err(|_| format!("expected a number, got {s:?}"))?;
        if !v.is_finite() {
            return Err(format!("expected a finite number, got {s:?}"));
        }
        Ok(v)
    }

    fn show(&self) -> String {
        // Rust prints the shortest representation that parses back to the same f32.
        self.to_string()
    }
}

impl Scalar for bool {
    fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => Err(format!("expected true or false, got {s:?}")),
        }
    }

    fn show(&self) -> String {
        self.to_string()
    }

    fn bare() -> Option<Self> {
        Some(true)
    }
}

impl Scalar for Range<f32> {
    fn parse(s: &str) -> Result<Self, String> {
        let (start, end) = s
            .split_once("..")
            .ok_or_else(|| format!("expected a range like 100..800, got {s:?}"))?;
        let (start, end) = (f32::parse(start.trim())?, f32::parse(end.trim())?);
        if start > end {
            return Err(format!("range start {start} is greater than its end {end}"));
        }
        Ok(start..end)
    }

    fn show(&self) -> String {
        format!("{}..{}", self.start, self.end)
    }
}

impl Scalar for AttentionWeight {
    fn parse(s: &str) -> Result<Self, String> {
        match s.split_once("..") {
            Some((start, end)) => Ok(AttentionWeight::Linear {
                start: f32::parse(start.trim())?,
                end: f32::parse(end.trim())?,
            }),
            None => f32::parse(s)
                .map(AttentionWeight::Constant)
                .map_err(|_| format!("expected a number or a linear start..end, got {s:?}")),
        }
    }

    fn show(&self) -> String {
        match self {
            AttentionWeight::Constant(w) => w.to_string(),
            AttentionWeight::Linear { start, end } => format!("{start}..{end}"),
        }
    }
}

impl Scalar for FactorDtype {
    fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().trim_start_matches("torch.") {
            "bfloat16" | "bf16" => Ok(FactorDtype::Bfloat16),
            "float16" | "fp16" | "half" => Ok(FactorDtype::Float16),
            "float32" | "fp32" | "float" => Ok(FactorDtype::Float32),
            _ => Err(format!(
                "expected bfloat16 (bf16), float16 (fp16) or float32 (fp32), got {s:?}"
            )),
        }
    }

    fn show(&self) -> String {
        self.name().to_owned()
    }
}

/// Module-name patterns; quoted when they contain a separator of the syntax.
impl Scalar for String {
    fn parse(s: &str) -> Result<Self, String> {
        let inner = match s.strip_prefix('"') {
            Some(rest) => rest
                .strip_suffix('"')
                .ok_or_else(|| format!("unterminated quote in {s:?}"))?,
            None => s,
        };
        if inner.is_empty() {
            return Err("empty identifier".into());
        }
        if inner.contains('"') {
            return Err(format!("identifiers cannot contain '\"': {s:?}"));
        }
        Ok(inner.to_owned())
    }

    fn show(&self) -> String {
        if self.is_empty() || self.contains([',', '/', '=', ':', ' ']) {
            format!("\"{self}\"")
        } else {
            self.clone()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quote-aware splitting

fn find_unquoted(s: &str, sep: char) -> Option<usize> {
    let mut quoted = false;
    for (at, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => return Some(at),
            _ => {}
        }
    }
    None
}

fn split_unquoted(s: &str, sep: char) -> Result<Vec<&str>, String> {
    if s.chars().filter(|&c| c == '"').count() % 2 != 0 {
        return Err(format!("unbalanced '\"' in {s:?}"));
    }
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(at) = find_unquoted(rest, sep) {
        parts.push(&rest[..at]);
        rest = &rest[at + sep.len_utf8()..];
    }
    parts.push(rest);
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::super::tests::samples;
    use super::*;

    fn parse_ok(s: &str) -> CacheConfig {
        CacheConfig::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn parse_err(s: &str) -> String {
        match CacheConfig::parse(s) {
            Ok(c) => panic!("{s} parsed as {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn display_round_trips_every_sample() {
        for config in samples() {
            let text = config.to_string();
            assert_eq!(parse_ok(&text), config, "{text}");
            // Printing is canonical: the parse of a printed config prints the same.
            assert_eq!(parse_ok(&text).to_string(), text);
        }
    }

    #[test]
    fn documented_example() {
        let config = parse_ok("taylorseer:cache_interval=5,max_order=1");
        assert_eq!(
            config,
            CacheConfig::TaylorSeer(TaylorSeerCacheConfig {
                cache_interval: Some(5),
                max_order: Some(1),
                ..Default::default()
            })
        );
        assert_eq!(
            config.to_string(),
            "taylorseer:cache_interval=5,max_order=1"
        );
        let parsed: CacheConfig = "taylorseer:cache_interval=5,max_order=1".parse().unwrap();
        assert_eq!(parsed, config);
    }

    #[test]
    fn strategy_aliases() {
        for s in ["none", "NONE", "off", " none "] {
            assert_eq!(parse_ok(s), CacheConfig::None);
        }
        for s in [
            "pab",
            "PyramidAttentionBroadcast",
            "pyramid_attention_broadcast",
        ] {
            assert_eq!(
                parse_ok(s).kind(),
                crate::CacheKind::PyramidAttentionBroadcast
            );
        }
        for s in ["fastercache", "faster-cache", "FasterCache"] {
            assert_eq!(parse_ok(s).kind(), crate::CacheKind::FasterCache);
        }
        for s in ["taylorseer", "taylor-seer", "TaylorSeer", "taylorseer:"] {
            assert_eq!(parse_ok(s).kind(), crate::CacheKind::TaylorSeer);
        }
        for s in [
            "fbc",
            "first-block-cache",
            "first_block_cache",
            "FirstBlockCache",
        ] {
            assert_eq!(parse_ok(s), FirstBlockCacheConfig::default().into());
        }
        for s in ["magcache", "mag-cache", "MagCache"] {
            assert_eq!(parse_ok(s).kind(), crate::CacheKind::MagCache);
        }
    }

    #[test]
    fn short_keys_and_value_forms() {
        assert_eq!(
            parse_ok("taylorseer: interval = 4, order=2, before=3, after=40, dtype=bf16, lite"),
            CacheConfig::TaylorSeer(TaylorSeerCacheConfig {
                cache_interval: Some(4),
                max_order: Some(2),
                disable_cache_before_step: Some(3),
                disable_cache_after_step: Some(40),
                taylor_factors_dtype: Some(FactorDtype::Bfloat16),
                use_lite_mode: Some(true),
                ..Default::default()
            })
        );
        assert_eq!(
            parse_ok("pab:spatial=3,spatial-range=100..800"),
            CacheConfig::PyramidAttentionBroadcast(PyramidAttentionBroadcastConfig {
                spatial_attention_block_skip_range: Some(3),
                spatial_attention_timestep_skip_range: Some(100.0..800.0),
                ..Default::default()
            })
        );
        assert_eq!(
            parse_ok("fbc:threshold=0.12"),
            CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
                threshold: Some(0.12)
            })
        );
        assert_eq!(
            parse_ok("magcache:thresh=0.06,ratios=1.0/1.2/1.1,steps=28,calibrate=false"),
            CacheConfig::MagCache(MagCacheConfig {
                threshold: Some(0.06),
                mag_ratios: vec![1.0, 1.2, 1.1],
                num_inference_steps: Some(28),
                ..Default::default()
            })
        );
        assert_eq!(
            parse_ok("magcache:calibrate"),
            CacheConfig::MagCache(MagCacheConfig {
                calibrate: true,
                ..Default::default()
            })
        );
        assert_eq!(
            parse_ok("fastercache:weight=0.3..0.7,distilled=yes,alpha_low=1.1"),
            CacheConfig::FasterCache(FasterCacheConfig {
                attention_weight: Some(AttentionWeight::Linear {
                    start: 0.3,
                    end: 0.7
                }),
                is_guidance_distilled: Some(true),
                alpha_low_frequency: Some(1.1),
                ..Default::default()
            })
        );
    }

    #[test]
    fn quoted_identifiers() {
        let config =
            parse_ok(r#"taylorseer:cache_identifiers="blocks\.\d{1,2}\.attn"/proj_out,order=1"#);
        let CacheConfig::TaylorSeer(t) = &config else {
            panic!("{config:?}")
        };
        assert_eq!(t.cache_identifiers, [r"blocks\.\d{1,2}\.attn", "proj_out"]);
        assert_eq!(t.max_order, Some(1));
        assert_eq!(parse_ok(&config.to_string()), config);
    }

    #[test]
    fn bad_strings_are_rejected_with_useful_messages() {
        let cases = [
            ("", "empty; expected a strategy"),
            (
                "teacache",
                "unknown cache strategy \"teacache\" (expected one of: none, pab",
            ),
            ("none:threshold=1", "\"none\" takes no parameters"),
            (
                "taylorseer:foo=1",
                "unknown key \"foo\" (expected one of: cache_interval (interval)",
            ),
            (
                "taylorseer:cache_interval=x",
                "cache_interval: expected a non-negative integer, got \"x\"",
            ),
            ("taylorseer:interval=-1", "expected a non-negative integer"),
            (
                "taylorseer:interval=2,cache_interval=3",
                "cache_interval is given more than once",
            ),
            ("taylorseer:cache_interval", "cache_interval: needs a value"),
            (
                "taylorseer:dtype=int8",
                "expected bfloat16 (bf16), float16 (fp16) or float32",
            ),
            (
                "fbc:threshold=abc",
                "threshold: expected a number, got \"abc\"",
            ),
            ("fbc:threshold=NaN", "expected a finite number"),
            ("pab:spatial_range=800", "expected a range like 100..800"),
            (
                "pab:spatial_range=800..100",
                "range start 800 is greater than its end 100",
            ),
            ("magcache:mag_ratios=", "needs at least one value"),
            (
                "magcache:mag_ratios=1.0/x",
                "mag_ratios: expected a number, got \"x\"",
            ),
            ("magcache:calibrate=maybe", "expected true or false"),
            (
                "fastercache:weight=high",
                "expected a number or a linear start..end",
            ),
            ("taylorseer:identifiers=\"abc", "unbalanced '\"'"),
        ];
        for (input, expected) in cases {
            let message = parse_err(input);
            assert!(
                message.contains(expected),
                "{input:?}: {message:?} lacks {expected:?}"
            );
            assert!(message.starts_with("invalid cache config"), "{message}");
        }
    }

    #[test]
    fn parse_error_converts_to_invalid_argument() {
        let err: crate::Error = CacheConfig::parse("bogus").unwrap_err().into();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
