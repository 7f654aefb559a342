//! FLUX conditioning embeddings: sinusoidal timestep projection, the timestep / guidance / pooled
//! text MLPs summed into `temb`, and the 3-axis rotary position embedding.
//!
//! Every op mirrors diffusers (`models/embeddings.py`) one for one, including the dtypes it computes
//! in, so that fp32 CPU runs agree to the last few ulps.
use tch::{Device, Kind, Tensor};

use crate::models::weights::Weights;
use crate::models::Result;

/// Channels of the sinusoidal timestep projection (`Timesteps(num_channels=256)`).
pub const TIMESTEP_PROJ_DIM: i64 = 256;

/// RoPE base frequency of `FluxPosEmbed`.
const ROPE_THETA: f64 = 10000.0;

/// A `nn.Linear` with bias: `weight [out, in]`, `bias [out]` (every FLUX linear has one).
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Loads `{prefix}.weight` (checked as `[out_dim, in_dim]`) and `{prefix}.bias`.
    pub fn load(w: &Weights, prefix: &str, in_dim: i64, out_dim: i64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?,
            bias: w.get(&format!("{prefix}.bias"), &[out_dim])?,
        })
    }

    /// `x W^T + b` over the last dim.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// diffusers `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`:
/// `[N]` timesteps (any float dtype) to `[N, dim]` f32 `[cos | sin]` features.
pub fn timestep_projection(timesteps: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10000f64.ln()));
    // `exponent / (half_dim - downscale_freq_shift)` with a shift of 0.
    let exponent = exponent / (half as f64);
    let freqs = exponent.exp();
    let emb = timesteps.unsqueeze(1).to_kind(Kind::Float) * freqs.unsqueeze(0);
    // `scale * emb` with scale 1 is exact and skipped; flip_sin_to_cos puts cos first.
    let emb = Tensor::cat(&[emb.cos(), emb.sin()], -1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// diffusers `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads `{prefix}.linear_1` (`in_dim -> dim`) and `{prefix}.linear_2` (`dim -> dim`).
    pub fn load(w: &Weights, prefix: &str, in_dim: i64, dim: i64) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(w, &format!("{prefix}.linear_1"), in_dim, dim)?,
            linear_2: Linear::load(w, &format!("{prefix}.linear_2"), dim, dim)?,
        })
    }

    /// `[N, in_dim]` -> `[N, dim]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}

/// diffusers `CombinedTimestepTextProjEmbeddings` (schnell) and
/// `CombinedTimestepGuidanceTextProjEmbeddings` (dev, with `guidance_embedder`): the `temb` vector
/// every block is modulated with. Weights under `time_text_embed.`.
#[derive(Debug)]
pub struct TimeTextEmbedding {
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: Option<TimestepEmbedding>,
    /// `PixArtAlphaTextProjection(act_fn="silu")`: same shape as a timestep MLP.
    text_embedder: TimestepEmbedding,
}

impl TimeTextEmbedding {
    /// `dim`: model width; `pooled_dim`: width of the pooled CLIP embedding.
    pub fn load(
        w: &Weights,
        prefix: &str,
        dim: i64,
        pooled_dim: i64,
        guidance: bool,
    ) -> Result<Self> {
        let guidance_embedder = if guidance {
            Some(TimestepEmbedding::load(
                w,
                &format!("{prefix}.guidance_embedder"),
                TIMESTEP_PROJ_DIM,
                dim,
            )?)
        } else {
            None
        };
        Ok(Self {
            timestep_embedder: TimestepEmbedding::load(
                w,
                &format!("{prefix}.timestep_embedder"),
                TIMESTEP_PROJ_DIM,
                dim,
            )?,
            guidance_embedder,
            text_embedder: TimestepEmbedding::load(
                w,
                &format!("{prefix}.text_embedder"),
                pooled_dim,
                dim,
            )?,
        })
    }

    /// `timestep`, `guidance`: `[B]` on the 0..1000 scale; `pooled`: `[B, pooled_dim]` -> `[B, D]`.
    /// Panics when the model has a guidance embedder and no guidance is given (or the reverse).
    pub fn forward(&self, timestep: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Tensor {
        let dtype = pooled.kind();
        let t_emb = self
            .timestep_embedder
            .forward(&timestep_projection(timestep, TIMESTEP_PROJ_DIM).to_kind(dtype));
        let t_emb = match (&self.guidance_embedder, guidance) {
            (Some(embedder), Some(g)) => {
                t_emb + embedder.forward(&timestep_projection(g, TIMESTEP_PROJ_DIM).to_kind(dtype))
            }
            (None, None) => t_emb,
            (Some(_), None) => {
                panic!("this FLUX transformer embeds guidance: a guidance tensor is required")
            }
            (None, Some(_)) => {
                panic!("this FLUX transformer has no guidance embedder: pass no guidance")
            }
        };
        t_emb + self.text_embedder.forward(pooled)
    }
}

/// Rotary embedding tables `(cos, sin)`, each `[S, head_dim]` f32 (diffusers `FluxPosEmbed`).
#[derive(Debug)]
pub struct Rope {
    /// `cos(angle)`, each angle repeated for the two entries of its pair.
    pub cos: Tensor,
    /// `sin(angle)`, likewise.
    pub sin: Tensor,
}

/// diffusers `FluxPosEmbed(theta=10000, axes_dim)` on `ids [S, 3]`: per axis, frequencies in f64
/// (f32 on MPS, which has no f64), each repeated twice (interleaved), axes concatenated.
pub fn rope(ids: &Tensor, axes_dims: &[i64]) -> Rope {
    let device = ids.device();
    let freqs_kind = if device == Device::Mps {
        Kind::Float
    } else {
        Kind::Double
    };
    let pos = ids.to_kind(Kind::Float);
    let mut cos = Vec::with_capacity(axes_dims.len());
    let mut sin = Vec::with_capacity(axes_dims.len());
    for (i, &dim) in axes_dims.iter().enumerate() {
        // freqs = 1 / theta^(arange(0, dim, 2) / dim)   [dim/2]
        let exponents = Tensor::arange_start_step(0, dim, 2, (freqs_kind, device)) / (dim as f64);
        let freqs = Tensor::pow_scalar(ROPE_THETA, &exponents).reciprocal();
        let angles = pos.select(1, i as i64).outer(&freqs); // [S, dim/2]
        let n = angles.size()[1] * 2;
        cos.push(
            angles
                .cos()
                .repeat_interleave_self_int(2, 1, n)
                .to_kind(Kind::Float),
        );
        sin.push(
            angles
                .sin()
                .repeat_interleave_self_int(2, 1, n)
                .to_kind(Kind::Float),
        );
    }
    Rope {
        cos: Tensor::cat(&cos, -1),
        sin: Tensor::cat(&sin, -1),
    }
}

/// diffusers `apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1,
/// sequence_dim=1)` on `x [B, S, H, D]`: pairs `(x[2i], x[2i+1])` rotate by the position angle,
/// computed in f32 and cast back to `x`'s dtype.
pub fn apply_rotary_emb(x: &Tensor, rope: &Rope) -> Tensor {
    let cos = rope.cos.unsqueeze(0).unsqueeze(2); // [1, S, 1, D]
    let sin = rope.sin.unsqueeze(0).unsqueeze(2);
    let size = x.size();
    let mut paired = size[..size.len() - 1].to_vec();
    paired.extend([-1, 2]);
    let halves = x.reshape(&paired).unbind(-1); // [B, S, H, D/2] twice
    let (real, imag) = (&halves[0], &halves[1]);
    let rotated = Tensor::stack(&[imag.neg(), real.shallow_clone()], -1).flatten(3, -1);
    (x.to_kind(Kind::Float) * cos + rotated.to_kind(Kind::Float) * sin).to_kind(x.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_projection_starts_with_cos() {
        let t = Tensor::from_slice(&[0f32, 500.0]);
        let emb = timestep_projection(&t, 8);
        assert_eq!(emb.size(), [2, 8]);
        // t = 0: cos = 1 for every frequency, sin = 0.
        let first: Vec<f32> = Vec::try_from(emb.get(0)).unwrap();
        assert_eq!(first, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // The first frequency is 1: cos(500), sin(500).
        let second: Vec<f32> = Vec::try_from(emb.get(1)).unwrap();
        assert!((second[0] - 500f32.cos()).abs() < 1e-4 && (second[4] - 500f32.sin()).abs() < 1e-4);
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        // One token at row 1 (axis 1), head dim 2+2+2: axis 0 and 2 angles are 0.
        let ids = Tensor::from_slice(&[0f32, 1.0, 0.0]).view([1, 3]);
        let r = rope(&ids, &[2, 2, 2]);
        assert_eq!(r.cos.size(), [1, 6]);
        let x = Tensor::from_slice(&[1f32, 0.0, 1.0, 0.0, 1.0, 0.0]).view([1, 1, 1, 6]);
        let y: Vec<f32> = Vec::try_from(apply_rotary_emb(&x, &r).flatten(0, -1)).unwrap();
        let (c, s) = (1f32.cos(), 1f32.sin());
        let expected = [1.0, 0.0, c, s, 1.0, 0.0];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}
