//! Encoded videos returned by video models.

use std::path::Path;
use std::time::Duration;

use denoised_proto::v1;

use crate::error::{Error, Result};
use crate::request::VideoFormat;

/// An encoded video as sent by the server.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Video {
    /// Container of `bytes`.
    pub format: VideoFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Number of frames.
    pub num_frames: u32,
    /// Frame rate.
    pub fps: u32,
    /// The encoded file contents.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Video {
    // The bytes are left out: a debug print of an event should not dump a megabyte.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Video")
            .field("format", &self.format)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("num_frames", &self.num_frames)
            .field("fps", &self.fps)
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .finish()
    }
}

impl Video {
    /// Play time: `num_frames / fps` (zero when the frame rate is unknown).
    pub fn duration(&self) -> Duration {
        Duration::try_from_secs_f64(f64::from(self.num_frames) / f64::from(self.fps))
            .unwrap_or_default()
    }

    /// Writes the video to `path` as it is. The extension must match the format (or be absent):
    /// unlike images, videos are not re-encoded on the client.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
            match VideoFormat::from_extension(ext) {
                Some(format) if format == self.format => {}
                Some(_) => {
                    return Err(Error::invalid(format!(
                        "cannot save {}: the video is {} (use .{})",
                        path.display(),
                        self.format,
                        self.format.extension()
                    )))
                }
                None => {
                    return Err(Error::invalid(format!(
                        "cannot save {}: unsupported extension {ext:?} (use .{})",
                        path.display(),
                        self.format.extension()
                    )))
                }
            }
        }
        std::fs::write(path, &self.bytes)?;
        Ok(())
    }

    /// Converts a proto video; the format falls back to sniffing the bytes when unspecified.
    pub fn from_proto(video: v1::Video) -> Result<Self> {
        let format = VideoFormat::from_proto(video.format)
            .or_else(|| sniff(&video.data))
            .ok_or_else(|| {
                Error::protocol(format!(
                    "video of unknown format {} ({} bytes)",
                    video.format,
                    video.data.len()
                ))
            })?;
        Ok(Video {
            format,
            width: video.width,
            height: video.height,
            num_frames: video.num_frames,
            fps: video.fps,
            bytes: video.data,
        })
    }

    /// The proto message.
    pub fn into_proto(self) -> v1::Video {
        v1::Video {
            format: self.format.into_proto().into(),
            width: self.width,
            height: self.height,
            num_frames: self.num_frames,
            fps: self.fps,
            data: self.bytes,
        }
    }
}

/// MP4 starts with an `ftyp` box (size, then the tag); GIF with its `GIF87a`/`GIF89a` signature.
fn sniff(bytes: &[u8]) -> Option<VideoFormat> {
    if bytes.get(4..8) == Some(b"ftyp") {
        Some(VideoFormat::Mp4)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(VideoFormat::Gif)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests::temp_dir;

    const MP4: &[u8] = b"\0\0\0\x20ftypisom\0\0\x02\0";
    const GIF: &[u8] = b"GIF89a\x04\0\x04\0";

    fn proto(format: v1::VideoFormat, data: &[u8]) -> v1::Video {
        v1::Video {
            format: format as i32,
            width: 48,
            height: 32,
            num_frames: 9,
            fps: 8,
            data: data.to_vec(),
        }
    }

    #[test]
    fn convert_and_save() {
        let video = Video::from_proto(proto(v1::VideoFormat::Gif, GIF)).unwrap();
        assert_eq!(video.format, VideoFormat::Gif);
        assert_eq!((video.width, video.height), (48, 32));
        assert_eq!((video.num_frames, video.fps), (9, 8));
        assert_eq!(video.duration(), Duration::from_millis(1125));
        assert_eq!(video.clone().into_proto(), proto(v1::VideoFormat::Gif, GIF));
        assert!(format!("{video:?}").contains("<10 bytes>"));

        let dir = temp_dir();
        video.save(dir.join("clip.gif")).unwrap();
        assert_eq!(std::fs::read(dir.join("clip.gif")).unwrap(), GIF);
        video.save(dir.join("clip")).unwrap();
        assert_eq!(std::fs::read(dir.join("clip")).unwrap(), GIF);
        for (name, message) in [
            ("clip.mp4", "the video is gif (use .gif)"),
            ("clip.avi", "unsupported extension \"avi\""),
        ] {
            let err = video.save(dir.join(name)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.to_string().contains(message), "{err}");
            assert!(!dir.join(name).exists());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unspecified_format_is_sniffed() {
        for (data, format) in [(MP4, VideoFormat::Mp4), (GIF, VideoFormat::Gif)] {
            let video = Video::from_proto(proto(v1::VideoFormat::Unspecified, data)).unwrap();
            assert_eq!(video.format, format);
        }
        let err =
            Video::from_proto(proto(v1::VideoFormat::Unspecified, b"RIFF....AVI ")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    #[test]
    fn unknown_frame_rate_has_no_duration() {
        let mut video = Video::from_proto(proto(v1::VideoFormat::Mp4, MP4)).unwrap();
        video.fps = 0;
        assert_eq!(video.duration(), Duration::ZERO);
    }
}
