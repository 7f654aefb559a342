//! Latents and decoded images to 8-bit RGB frames: diffusers' image post-processing, and the
//! cheap linear latent-to-RGB preview (one 3-vector per latent channel plus a bias, at latent
//! resolution, as ComfyUI and InvokeAI do). Shared by every family.
use tch::{Device, Kind, Tensor};

use crate::dit::pipeline::Frames;

/// A linear latent-to-RGB projection.
#[derive(Debug, Clone)]
pub struct LatentRgb {
    /// `[C, 3]`.
    factors: Vec<[f32; 3]>,
    bias: [f32; 3],
}

impl LatentRgb {
    /// Factors fitted for a VAE's latent space (rows: latent channels; columns: R, G, B).
    pub fn new(factors: &[[f32; 3]], bias: [f32; 3]) -> Self {
        Self {
            factors: factors.to_vec(),
            bias,
        }
    }

    /// For latents without fitted factors: the first three channels, each scaled by 0.5, stand in
    /// for R, G and B.
    pub fn first_channels(channels: usize) -> Self {
        let factors = (0..channels)
            .map(|c| {
                let mut row = [0.0; 3];
                if c < 3 {
                    row[c] = 0.5;
                }
                row
            })
            .collect();
        Self {
            factors,
            bias: [0.0; 3],
        }
    }

    pub fn channels(&self) -> usize {
        self.factors.len()
    }

    /// `latents`: `[B, C, h, w]` predicted clean latents → the first one as an `h × w` frame.
    pub fn project(&self, latents: &Tensor) -> Frames {
        let (_, c, h, w) = latents.size4().expect("latents are [B, C, h, w]");
        let factors: Vec<f32> = self.factors.iter().flatten().copied().collect();
        let factors = Tensor::from_slice(&factors).view([c, 3]);
        let bias = Tensor::from_slice(&self.bias);
        // [h, w, C] x [C, 3] -> [h, w, 3]
        let x = latents
            .get(0)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .permute([1, 2, 0]);
        let rgb = x.matmul(&factors) + bias;
        let rgb = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5)
            .round()
            .to_kind(Kind::Uint8);
        frame(&rgb, w, h)
    }
}

/// diffusers' postprocess to 8-bit RGB of the first image of `image` (`[B, 3, H, W]` or
/// `[3, H, W]`): `(x·0.5 + 0.5).clamp(0, 1)` in the image's dtype, then in f32
/// `(x·255).round()` (half to even, as numpy).
pub fn to_rgb8(image: &Tensor) -> Frames {
    let image = if image.dim() == 4 {
        image.get(0)
    } else {
        image.shallow_clone()
    };
    let (_, h, w) = image.size3().expect("image is [3, H, W]");
    let unit = (image * 0.5 + 0.5).clamp(0.0, 1.0);
    let bytes = (unit.to_device(Device::Cpu).to_kind(Kind::Float) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0]);
    frame(&bytes, w, h)
}

/// One frame from `[h, w, 3]` u8 pixels.
fn frame(hwc: &Tensor, w: i64, h: i64) -> Frames {
    let len = (h * w * 3) as usize;
    let mut rgb = vec![0u8; len];
    hwc.contiguous().copy_data_u8(&mut rgb, len);
    Frames {
        width: w as u32,
        height: h as u32,
        frames: vec![rgb],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_latents_with_their_factors() {
        let z = Tensor::zeros([1, 4, 4, 6], (Kind::Float, Device::Cpu));
        let rgb = LatentRgb::new(&[[0.1, 0.0, 0.0]; 4], [-0.5, 0.0, 0.5]).project(&z);
        assert_eq!((rgb.width, rgb.height, rgb.frames[0].len()), (6, 4, 72));
        // Zero latents show the bias colour.
        assert_eq!(&rgb.frames[0][..3], &[64, 128, 191]);
        let ones = Tensor::ones([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let first = LatentRgb::first_channels(4).project(&ones);
        assert_eq!(&first.frames[0][..3], &[191, 191, 191]);
    }

    #[test]
    fn postprocess_rounds_half_to_even() {
        // 0.5·x + 0.5 = 0.5 -> 127.5 -> 128 (even); -1 -> 0; 3 -> clamped to 255.
        let image = Tensor::from_slice(&[0.0f32, -1.0, 3.0]).view([3, 1, 1]);
        let rgb = to_rgb8(&image);
        assert_eq!(rgb.frames[0], [128, 0, 255]);
    }
}
