//! Layers shared by every model family, each mirroring its PyTorch / diffusers counterpart op for
//! op (same dtypes, same order), with weights looked up once by their diffusers names.
use tch::{Kind, Tensor};

use crate::models::weights::Weights;
use crate::models::Result;

/// `nn.Linear`: `weight [out, in]` and, when the layer has one, `bias [out]`.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (checked as `[out_dim, in_dim]`) and `{prefix}.bias`.
    pub fn load(w: &Weights, prefix: &str, in_dim: i64, out_dim: i64) -> Result<Self> {
        Self::load_with_bias(w, prefix, in_dim, out_dim, true)
    }

    /// Like [`load`](Self::load), the bias only when `bias` (as the config says).
    pub fn load_with_bias(
        w: &Weights,
        prefix: &str,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?,
            bias: if bias {
                Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
            } else {
                None
            },
        })
    }

    /// `x W^T + b` over the last dim.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `nn.LayerNorm(dim, eps, elementwise_affine)` over the last dim.
#[derive(Debug)]
pub struct LayerNorm {
    /// `(weight, bias)` when affine.
    affine: Option<(Tensor, Tensor)>,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    /// An affine layer norm: `{prefix}.weight` and `{prefix}.bias`, `[dim]` each.
    pub fn load(w: &Weights, prefix: &str, dim: i64, eps: f64) -> Result<Self> {
        Self::load_with_affine(w, prefix, dim, eps, true)
    }

    /// Affine (with weights) only when `affine`.
    pub fn load_with_affine(
        w: &Weights,
        prefix: &str,
        dim: i64,
        eps: f64,
        affine: bool,
    ) -> Result<Self> {
        let affine = if affine {
            Some((
                w.get(&format!("{prefix}.weight"), &[dim])?,
                w.get(&format!("{prefix}.bias"), &[dim])?,
            ))
        } else {
            None
        };
        Ok(Self { affine, dim, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (weight, bias) = match &self.affine {
            Some((w, b)) => (Some(w), Some(b)),
            None => (None, None),
        };
        x.layer_norm([self.dim], weight, bias, self.eps, true)
    }
}

/// `F.scaled_dot_product_attention` (no mask, no dropout) on `[B, S, H, Dh]` queries, keys and
/// values, as diffusers' processors call it on the heads-first transpose; returns `[B, S, H·Dh]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let heads_first = |x: &Tensor| x.permute([0, 2, 1, 3]);
    Tensor::scaled_dot_product_attention(
        &heads_first(q),
        &heads_first(k),
        &heads_first(v),
        None::<Tensor>,
        0.0,
        false,
        None,
        false,
    )
    .permute([0, 2, 1, 3])
    .flatten(2, 3)
}

/// diffusers `FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")`:
/// `net.2(gelu_tanh(net.0.proj(x)))` with an `inner`-wide hidden layer.
#[derive(Debug)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn load(w: &Weights, prefix: &str, dim: i64, inner: i64) -> Result<Self> {
        Ok(Self {
            proj_in: Linear::load(w, &format!("{prefix}.net.0.proj"), dim, inner)?,
            proj_out: Linear::load(w, &format!("{prefix}.net.2"), inner, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.proj_out.forward(&self.proj_in.forward(x).gelu("tanh"))
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

/// Rotary embedding tables `(cos, sin)`, each `[S, head_dim]` f32 (diffusers `FluxPosEmbed`, `get_3d_rotary_pos_embed`).
#[derive(Debug)]
pub struct Rope {
    /// `cos(angle)`, each angle repeated for the two entries of its pair.
    pub cos: Tensor,
    /// `sin(angle)`, likewise.
    pub sin: Tensor,
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
}
