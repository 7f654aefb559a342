//! Encoding decoded frames for the client: images here, videos in `video`.
use std::io::Cursor;

use image::{codecs::jpeg::JpegEncoder, imageops::FilterType, RgbImage};

use crate::dit::pipeline::Frames;
use crate::dit::request::ImageFormat;
use crate::error::{ServiceError, ServiceResult};

mod video;
pub use video::{encode_video, frames_strip, EncodedVideo, VideoFormat};

/// An encoded image, as it goes to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedImage {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Encodes the first frame as PNG or JPEG, scaled so the longest edge is `max_edge` (0: as it
/// is). Frames smaller than `max_edge` are scaled up with nearest-neighbour filtering so
/// latent-resolution previews stay legible.
pub fn encode_image(
    frames: Frames,
    format: ImageFormat,
    max_edge: u32,
) -> ServiceResult<EncodedImage> {
    let Frames {
        width,
        height,
        frames,
    } = frames;
    let rgb = frames
        .into_iter()
        .next()
        .ok_or_else(|| ServiceError::Internal("no frame to encode".into()))?;
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
        ImageFormat::Jpeg => img.write_with_encoder(JpegEncoder::new_with_quality(
            &mut Cursor::new(&mut data),
            90,
        )),
        ImageFormat::Png => img.write_to(&mut Cursor::new(&mut data), image::ImageFormat::Png),
    };
    encoded.map_err(|e| ServiceError::Internal(format!("image encoding failed: {e}")))?;
    Ok(EncodedImage {
        format,
        width: img.width(),
        height: img.height(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(width: u32, height: u32, value: u8) -> Frames {
        Frames {
            width,
            height,
            frames: vec![vec![value; (width * height * 3) as usize]],
        }
    }

    #[test]
    fn encodes_png_and_jpeg_scaled_to_the_edge() {
        let png = encode_image(frames(6, 4, 200), ImageFormat::Png, 12).unwrap();
        assert_eq!((png.width, png.height), (12, 8));
        let decoded = image::load_from_memory(&png.data).unwrap().to_rgb8();
        assert_eq!(decoded.width(), 12);
        assert_eq!(decoded.get_pixel(11, 7).0, [200, 200, 200]);
        let jpeg = encode_image(frames(6, 4, 128), ImageFormat::Jpeg, 0).unwrap();
        assert_eq!((jpeg.format, jpeg.width), (ImageFormat::Jpeg, 6));
        assert_eq!(&jpeg.data[..2], &[0xFF, 0xD8]);
        let bad = Frames {
            frames: vec![vec![0; 5]],
            ..frames(6, 4, 0)
        };
        assert!(encode_image(bad, ImageFormat::Png, 0).is_err());
    }
}
