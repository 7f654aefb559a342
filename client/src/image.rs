//! Encoded images returned by the server (final images and previews).

use std::path::Path;

use denoised_proto::v1;

use crate::error::{Error, Result};
use crate::request::ImageFormat;

/// An encoded image as sent by the server.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Image {
    /// Encoding of `bytes`.
    pub format: ImageFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The encoded file contents.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Image {
    // The bytes are left out: a debug print of an event should not dump a megabyte.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("format", &self.format)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .finish()
    }
}

impl Image {
    /// Decodes the image.
    pub fn to_dynamic_image(&self) -> Result<image::DynamicImage> {
        let format = match self.format {
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        };
        Ok(image::load_from_memory_with_format(&self.bytes, format)?)
    }

    /// Writes the image to `path`. The bytes are written as they are when the extension matches
    /// the format (or there is none); otherwise the image is re-encoded (PNG or JPEG).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let target = match path.extension().and_then(|e| e.to_str()) {
            None => self.format,
            Some(ext) => ImageFormat::from_extension(ext).ok_or_else(|| {
                Error::invalid(format!(
                    "cannot save {}: unsupported extension {ext:?} (use .png, .jpg or .jpeg)",
                    path.display()
                ))
            })?,
        };
        if target == self.format {
            std::fs::write(path, &self.bytes)?;
        } else {
            // JPEG has no alpha channel, so convert to RGB first.
            self.to_dynamic_image()?.to_rgb8().save(path)?;
        }
        Ok(())
    }

    /// Converts a proto image; the format falls back to sniffing the bytes when unspecified.
    pub fn from_proto(image: v1::Image) -> Result<Self> {
        let format = ImageFormat::from_proto(image.format)
            .or_else(|| sniff(&image.data))
            .ok_or_else(|| {
                Error::protocol(format!(
                    "image of unknown format {} ({} bytes)",
                    image.format,
                    image.data.len()
                ))
            })?;
        Ok(Image {
            format,
            width: image.width,
            height: image.height,
            bytes: image.data,
        })
    }

    /// The proto message.
    pub fn into_proto(self) -> v1::Image {
        v1::Image {
            format: self.format.into_proto().into(),
            width: self.width,
            height: self.height,
            data: self.bytes,
        }
    }
}

fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(ImageFormat::Jpeg)
    } else {
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small encoded test image.
    pub(crate) fn encoded(format: ImageFormat, width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 40) as u8, (y * 40) as u8, 128])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        let f = match format {
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        };
        img.write_to(&mut out, f).unwrap();
        out.into_inner()
    }

    /// A fresh directory for this test thread (remove it at the end of the test).
    pub(crate) fn temp_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "denoised-client-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn decode_and_save() {
        let proto = v1::Image {
            format: v1::ImageFormat::Png as i32,
            width: 6,
            height: 4,
            data: encoded(ImageFormat::Png, 6, 4),
        };
        let image = Image::from_proto(proto.clone()).unwrap();
        assert_eq!(image.clone().into_proto(), proto);
        let decoded = image.to_dynamic_image().unwrap();
        assert_eq!((decoded.width(), decoded.height()), (6, 4));

        let dir = temp_dir();
        image.save(dir.join("a.png")).unwrap();
        assert_eq!(std::fs::read(dir.join("a.png")).unwrap(), image.bytes);
        image.save(dir.join("a.jpg")).unwrap();
        let jpeg = std::fs::read(dir.join("a.jpg")).unwrap();
        assert_eq!(sniff(&jpeg), Some(ImageFormat::Jpeg));
        let err = image.save(dir.join("a.webp")).unwrap_err();
        assert!(err.to_string().contains("unsupported extension"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unspecified_format_is_sniffed() {
        let image = Image::from_proto(v1::Image {
            format: 0,
            width: 2,
            height: 2,
            data: encoded(ImageFormat::Jpeg, 2, 2),
        })
        .unwrap();
        assert_eq!(image.format, ImageFormat::Jpeg);

        let err = Image::from_proto(v1::Image {
            data: b"GIF89a".to_vec(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
    }
}
