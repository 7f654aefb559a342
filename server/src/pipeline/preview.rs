//! Step previews and image encoding.
//!
//! The cheap preview projects the predicted clean latents to RGB with a linear map (one 3-vector
//! per latent channel plus a bias), at latent resolution, as ComfyUI and InvokeAI do.
use std::io::Cursor;

use denoised_proto::v1 as pb;
use image::{codecs::jpeg::JpegEncoder, imageops::FilterType, ImageFormat, RgbImage};
use tch::{Kind, Tensor};

use crate::error::{ServiceError, ServiceResult};

/// ComfyUI's FLUX.1 latent-to-RGB factors (rows: the 16 latent channels; columns: R, G, B),
/// valid in the pipeline's normalized latent space.
const FLUX1_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const FLUX1_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// A linear latent-to-RGB projection.
#[derive(Debug, Clone)]
pub struct LatentRgb {
    /// `[C, 3]`.
    factors: Vec<[f32; 3]>,
    bias: [f32; 3],
}

impl LatentRgb {
    /// FLUX.1's factors for 16-channel latents; for other VAEs (fitted factors unknown) the first
    /// three channels, each standardized, stand in for R, G and B.
    pub fn for_channels(channels: usize) -> Self {
        if channels == FLUX1_FACTORS.len() {
            Self {
                factors: FLUX1_FACTORS.to_vec(),
                bias: FLUX1_BIAS,
            }
        } else {
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
    }

    /// `latents`: `[1, C, h, w]` predicted clean latents → `(w, h, RGB8 bytes)`.
    pub fn project(&self, latents: &Tensor) -> (u32, u32, Vec<u8>) {
        let (_, c, h, w) = latents.size4().expect("latents are [B, C, h, w]");
        let factors: Vec<f32> = self.factors.iter().flatten().copied().collect();
        let factors = Tensor::from_slice(&factors).view([c, 3]);
        let bias = Tensor::from_slice(&self.bias);
        // [h, w, C] x [C, 3] -> [h, w, 3]
        let x = latents
            .get(0)
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .permute([1, 2, 0]);
        let rgb = x.matmul(&factors) + bias;
        let rgb = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5)
            .round()
            .to_kind(Kind::Uint8)
            .contiguous();
        let len = (h * w * 3) as usize;
        let mut bytes = vec![0u8; len];
        rgb.copy_data_u8(&mut bytes, len);
        (w as u32, h as u32, bytes)
    }
}

/// Encodes RGB8 pixels as PNG or JPEG, scaled down so the longest edge is at most `max_edge`
/// (0: no limit). Previews that are smaller than `max_edge` are scaled up with nearest-neighbour
/// filtering so latent-resolution previews stay legible.
pub fn encode_image(
    width: u32,
    height: u32,
    rgb: Vec<u8>,
    format: pb::ImageFormat,
    max_edge: u32,
) -> ServiceResult<pb::Image> {
    let mut img = RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| ServiceError::Internal("pixel buffer does not match image size".into()))?;
    let edge = width.max(height);
    if max_edge > 0 && edge != max_edge {
        let scale = max_edge as f64 / edge as f64;
        let (w, h) = (
            ((width as f64 * scale).round() as u32).max(1),
            ((height as f64 * scale).round() as u32).max(1),
        );
        let filter = if scale > 1.0 {
            FilterType::Nearest
        } else {
            FilterType::Triangle
        };
        img = image::imageops::resize(&img, w, h, filter);
    }
    let mut data = Vec::new();
    let encoded = match format {
        pb::ImageFormat::Jpeg => img.write_with_encoder(JpegEncoder::new_with_quality(
            &mut Cursor::new(&mut data),
            90,
        )),
        _ => img.write_to(&mut Cursor::new(&mut data), ImageFormat::Png),
    };
    encoded.map_err(|e| ServiceError::Internal(format!("image encoding failed: {e}")))?;
    Ok(pb::Image {
        format: if format == pb::ImageFormat::Jpeg {
            pb::ImageFormat::Jpeg
        } else {
            pb::ImageFormat::Png
        } as i32,
        width: img.width(),
        height: img.height(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_flux_latents_and_encodes() {
        let z = Tensor::zeros([1, 16, 4, 6], (Kind::Float, tch::Device::Cpu));
        let (w, h, rgb) = LatentRgb::for_channels(16).project(&z);
        assert_eq!((w, h, rgb.len()), (6, 4, 72));
        // Zero latents show the bias colour.
        assert_eq!(rgb[0], ((-0.0329f32 + 1.0) * 127.5).round() as u8);
        let png = encode_image(w, h, rgb, pb::ImageFormat::Png, 12).unwrap();
        assert_eq!((png.width, png.height), (12, 8));
        let decoded = image::load_from_memory(&png.data).unwrap();
        assert_eq!(decoded.width(), 12);
        let jpeg = encode_image(6, 4, vec![128; 72], pb::ImageFormat::Jpeg, 0).unwrap();
        assert_eq!(jpeg.format, pb::ImageFormat::Jpeg as i32);
        assert_eq!(&jpeg.data[..2], &[0xFF, 0xD8]);
    }
}
