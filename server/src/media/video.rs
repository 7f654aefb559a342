//! Encoding generated videos for the client, and a strip of frames for video step previews.
//!
//! MP4 holds H.264 from OpenH264 (Cisco's BSD-2 source, built by the `openh264` crate): constrained
//! baseline profile, yuv420p, BT.601 limited range (signalled in the SPS), at a constant frame rate.
//! The boxes come from `mp4-atom` in fast-start order (`ftyp`, `moov`, `mdat`), so players can start
//! before the whole file has arrived. GIF is the fallback that plays wherever images do and takes
//! any size, at 256 colours a frame.
//!
//! Patents: OpenH264's source is BSD-2, but H.264 is patent-encumbered, and Cisco covers the MPEG LA
//! royalties only for the prebuilt binaries it distributes; this build compiles the source instead.
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};
use mp4_atom::{
    Avc1, Avcc, Dinf, Dref, DrefEntry, Encode, FixedPoint, FourCC, Ftyp, Hdlr, Mdat, Mdhd, Mdia,
    Minf, Moov, Mvhd, Stbl, Stco, Stsc, StscEntry, Stsd, Stss, Stsz, StszSamples, Stts, SttsEntry,
    Tkhd, Trak, Url, Visual, Vmhd,
};
use openh264::encoder::{
    EncodedBitStream, Encoder, EncoderConfig, FrameRate, RateControlMode, VuiConfig,
};
use openh264::formats::YUVBuffer;
use openh264::OpenH264API;

use crate::dit::pipeline::Frames;
pub use crate::dit::request::VideoFormat;
use crate::error::{ServiceError, ServiceResult};

/// An encoded video, as it goes to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedVideo {
    pub format: VideoFormat,
    /// Picture size; for MP4, odd input sizes come out one pixel larger (see [`encode_video`]).
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub fps: u32,
    pub data: Vec<u8>,
}

/// The most frames a second an MP4 carries; a generous bound that keeps timescales small.
const MP4_MAX_FPS: u32 = VideoFormat::Mp4.max_fps();
/// GIF delays are whole centiseconds, and browsers slow anything under 2 cs down to 10 cs.
const GIF_MAX_FPS: u32 = VideoFormat::Gif.max_fps();
/// OpenH264 refuses pictures with an edge under 16 pixels (one macroblock).
const H264_MIN_EDGE: u32 = 16;
/// OpenH264's largest picture, in either orientation.
const H264_MAX_EDGE: (u32, u32) = (3840, 2160);
/// NeuQuant sampling for GIF palettes (1 best, 30 fastest); 10 is the `gif` crate's usual pick.
const GIF_QUANTIZER_SPEED: i32 = 10;
/// MP4 media ticks per frame: timescale = `fps` × this, so every duration is exact.
const TICKS_PER_FRAME: u32 = 1000;

/// Encodes every frame as a video at a constant `fps`.
///
/// H.264 needs even sizes: for MP4, an odd width or height is padded by repeating the last column or
/// row, and the result reports the padded size. Sizes under 16×16 and `fps` out of range are refused
/// with an invalid-argument error naming `width`, `height` or `fps`; a single frame is a one-frame
/// video. Encoding is CPU work (about half a second for 49 frames at 720×480 as MP4, several
/// seconds as GIF), so call it off the async runtime.
pub fn encode_video(frames: &Frames, fps: u32, format: VideoFormat) -> ServiceResult<EncodedVideo> {
    let count = checked_frame_count(frames)?;
    let (width, height, data) = match format {
        VideoFormat::Mp4 => encode_mp4(frames, fps)?,
        VideoFormat::Gif => encode_gif(frames, fps)?,
    };
    Ok(EncodedVideo {
        format,
        width,
        height,
        frames: count,
        fps,
        data,
    })
}

/// Up to `max_frames` frames (at least one), sampled evenly from the first to the last, side by side
/// in one frame: a cheap step preview of a video for [`super::encode_image`].
pub fn frames_strip(frames: &Frames, max_frames: usize) -> ServiceResult<Frames> {
    checked_frame_count(frames)?;
    let total = frames.frames.len();
    let picked = max_frames.clamp(1, total);
    let width = u32::try_from(picked)
        .ok()
        .and_then(|n| frames.width.checked_mul(n))
        .ok_or_else(|| ServiceError::Internal("frame strip too wide".into()))?;
    let row = frames.width as usize * 3;
    let mut strip = vec![0; row * picked * frames.height as usize];
    for slot in 0..picked {
        // Rounded j·(n−1)/(k−1): the first and last frames are always in.
        let index = match picked {
            1 => 0,
            _ => (2 * slot * (total - 1) + picked - 1) / (2 * (picked - 1)),
        };
        let frame = &frames.frames[index];
        for (y, src) in frame.chunks_exact(row).enumerate() {
            let at = (y * picked + slot) * row;
            strip[at..at + row].copy_from_slice(src);
        }
    }
    Ok(Frames {
        width,
        height: frames.height,
        frames: vec![strip],
    })
}

/// The frame count, once every buffer is known to hold `height × width × 3` bytes.
fn checked_frame_count(frames: &Frames) -> ServiceResult<u32> {
    if frames.frames.is_empty() {
        return Err(ServiceError::Internal("no frame to encode".into()));
    }
    let size = (frames.width as usize)
        .checked_mul(frames.height as usize)
        .and_then(|n| n.checked_mul(3))
        .filter(|&n| n > 0)
        .ok_or_else(|| ServiceError::Internal("frames have no pixels".into()))?;
    if let Some(i) = frames.frames.iter().position(|f| f.len() != size) {
        return Err(ServiceError::Internal(format!(
            "pixel buffer of frame {i} does not match the frame size"
        )));
    }
    u32::try_from(frames.frames.len()).map_err(|_| ServiceError::Internal("too many frames".into()))
}

fn encode_mp4(frames: &Frames, fps: u32) -> ServiceResult<(u32, u32, Vec<u8>)> {
    if !(1..=MP4_MAX_FPS).contains(&fps) {
        return Err(ServiceError::invalid(
            "fps",
            format!("must be 1 to {MP4_MAX_FPS} for MP4, got {fps}"),
        ));
    }
    for (field, edge) in [("width", frames.width), ("height", frames.height)] {
        if edge < H264_MIN_EDGE {
            return Err(ServiceError::invalid(
                field,
                format!("MP4 (H.264) needs at least {H264_MIN_EDGE} pixels, got {edge}; GIF takes any size"),
            ));
        }
    }
    let (width, height) = (
        frames.width + frames.width % 2,
        frames.height + frames.height % 2,
    );
    let (long, short) = H264_MAX_EDGE;
    if width.max(height) > long || width.min(height) > short {
        let field = if width >= height { "width" } else { "height" };
        return Err(ServiceError::invalid(
            field,
            format!(
                "MP4 (H.264) takes at most {long}×{short} or {short}×{long}, got {width}×{height}"
            ),
        ));
    }

    let config = EncoderConfig::new()
        // A constant quantiser: steady quality at any size and frame rate, and the bitrate-driven
        // modes would drop frames (or warn on stderr when told not to).
        .rate_control_mode(RateControlMode::Off)
        .skip_frames(false)
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .vui(VuiConfig::bt601());
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| ServiceError::Internal(format!("H.264 encoder failed to start: {e}")))?;
    let mut track = H264Track::default();
    for (i, rgb) in frames.frames.iter().enumerate() {
        let yuv = YUVBuffer::from_vec(
            rgb_to_i420(rgb, frames.width as usize, frames.height as usize),
            width as usize,
            height as usize,
        );
        let bitstream = encoder
            .encode(&yuv)
            .map_err(|e| ServiceError::Internal(format!("H.264 encoding failed: {e}")))?;
        track.push(&bitstream, i)?;
    }
    let data = track
        .into_mp4(width, height, fps)
        .map_err(|e| ServiceError::Internal(format!("MP4 muxing failed: {e}")))?;
    Ok((width, height, data))
}

/// RGB8 to I420 with the BT.601 limited-range matrix (ffmpeg's default, and what the SPS signals),
/// rounded, chroma from 2×2 averages. Odd sizes gain a last column or row repeating their neighbour.
fn rgb_to_i420(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    let (padded_w, padded_h) = (width + width % 2, height + height % 2);
    let (chroma_w, chroma_h) = (padded_w / 2, padded_h / 2);
    let pixel = |x: usize, y: usize| {
        let i = (y.min(height - 1) * width + x.min(width - 1)) * 3;
        [rgb[i], rgb[i + 1], rgb[i + 2]].map(i32::from)
    };
    let mut yuv = vec![0; padded_w * padded_h + 2 * chroma_w * chroma_h];
    let (luma, chroma) = yuv.split_at_mut(padded_w * padded_h);
    let (cb, cr) = chroma.split_at_mut(chroma_w * chroma_h);
    for y in 0..padded_h {
        for x in 0..padded_w {
            let [r, g, b] = pixel(x, y);
            luma[y * padded_w + x] = (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8;
        }
    }
    for y in 0..chroma_h {
        for x in 0..chroma_w {
            let mut sum = [0; 3];
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = pixel(2 * x + dx, 2 * y + dy);
                (0..3).for_each(|c| sum[c] += p[c]);
            }
            let [r, g, b] = sum;
            // Sums of four: shift by 2 more than the luma's 8, rounding with half of 1 << 10.
            cb[y * chroma_w + x] = (((-38 * r - 74 * g + 112 * b + 512) >> 10) + 128) as u8;
            cr[y * chroma_w + x] = (((112 * r - 94 * g - 18 * b + 512) >> 10) + 128) as u8;
        }
    }
    yuv
}

/// H.264 access units gathered for MP4: NAL units with 4-byte length prefixes (not Annex B start
/// codes), and the parameter sets that belong in `avcC`.
#[derive(Default)]
struct H264Track {
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    data: Vec<u8>,
    sizes: Vec<u32>,
    /// 1-based numbers of the samples that start with an IDR picture.
    sync: Vec<u32>,
}

impl H264Track {
    fn push(&mut self, bitstream: &EncodedBitStream<'_>, frame: usize) -> ServiceResult<()> {
        let start = self.data.len();
        let mut idr = false;
        let layers = (0..bitstream.num_layers()).filter_map(|l| bitstream.layer(l));
        for layer in layers {
            for nal in (0..layer.nal_count()).filter_map(|n| layer.nal_unit(n)) {
                let nal = strip_start_code(nal).ok_or_else(|| {
                    ServiceError::Internal(
                        "H.264 encoder wrote a NAL unit without start code".into(),
                    )
                })?;
                match nal[0] & 0x1F {
                    7 => set_parameter_set(&mut self.sps, nal)?,
                    8 => set_parameter_set(&mut self.pps, nal)?,
                    kind => {
                        idr |= kind == 5;
                        let len = u32::try_from(nal.len()).map_err(|_| {
                            ServiceError::Internal("H.264 NAL unit too large".into())
                        })?;
                        self.data.extend_from_slice(&len.to_be_bytes());
                        self.data.extend_from_slice(nal);
                    }
                }
            }
        }
        let size = u32::try_from(self.data.len() - start)
            .map_err(|_| ServiceError::Internal("H.264 picture too large".into()))?;
        if size == 0 {
            return Err(ServiceError::Internal(format!(
                "H.264 encoder produced no picture for frame {frame}"
            )));
        }
        self.sizes.push(size);
        if idr {
            // At most u32::MAX frames: checked before encoding.
            self.sync.push(self.sizes.len() as u32);
        }
        Ok(())
    }

    fn into_mp4(self, width: u32, height: u32, fps: u32) -> mp4_atom::Result<Vec<u8>> {
        let (Some(sps), Some(pps)) = (&self.sps, &self.pps) else {
            return Err(mp4_atom::Error::MissingBox(FourCC::new(b"avcC")));
        };
        let avcc = Avcc::new(sps, pps)?;
        let mut file = Vec::new();
        Ftyp {
            major_brand: FourCC::new(b"isom"),
            minor_version: 0x200,
            compatible_brands: [b"isom", b"iso2", b"avc1", b"mp41"]
                .map(FourCC::new)
                .to_vec(),
        }
        .encode(&mut file)?;
        // The chunk offset does not change the size of `moov`: measure it, then write it for real.
        let mut probe = Vec::new();
        self.moov(&avcc, width, height, fps, 0).encode(&mut probe)?;
        let offset = u32::try_from(file.len() + probe.len() + 8)
            .map_err(|_| mp4_atom::Error::TooLarge(FourCC::new(b"stco")))?;
        self.moov(&avcc, width, height, fps, offset)
            .encode(&mut file)?;
        Mdat { data: self.data }.encode(&mut file)?;
        Ok(file)
    }

    /// One video track, one chunk holding every sample.
    fn moov(&self, avcc: &Avcc, width: u32, height: u32, fps: u32, chunk_offset: u32) -> Moov {
        let timescale = fps * TICKS_PER_FRAME;
        let duration = self.sizes.len() as u64 * u64::from(TICKS_PER_FRAME);
        // Sizes are at most 3840: checked before encoding.
        let (w, h) = (width as u16, height as u16);
        Moov {
            mvhd: Mvhd {
                timescale,
                duration,
                rate: FixedPoint::from(1),
                volume: FixedPoint::from(1),
                next_track_id: 2,
                ..Default::default()
            },
            trak: vec![Trak {
                tkhd: Tkhd {
                    track_id: 1,
                    duration,
                    enabled: true,
                    in_movie: true,
                    width: FixedPoint::from(w),
                    height: FixedPoint::from(h),
                    ..Default::default()
                },
                mdia: Mdia {
                    mdhd: Mdhd {
                        timescale,
                        duration,
                        language: "und".into(),
                        ..Default::default()
                    },
                    hdlr: Hdlr {
                        handler: FourCC::new(b"vide"),
                        name: "VideoHandler".into(),
                    },
                    minf: Minf {
                        vmhd: Some(Vmhd::default()),
                        dinf: Dinf {
                            dref: Dref {
                                entries: vec![DrefEntry::Url(Url::default())],
                            },
                        },
                        stbl: Stbl {
                            stsd: Stsd {
                                codecs: vec![Avc1 {
                                    visual: Visual {
                                        data_reference_index: 1,
                                        width: w,
                                        height: h,
                                        ..Default::default()
                                    },
                                    avcc: avcc.clone(),
                                    ..Default::default()
                                }
                                .into()],
                            },
                            stts: Stts {
                                entries: vec![SttsEntry {
                                    sample_count: self.sizes.len() as u32,
                                    sample_delta: TICKS_PER_FRAME,
                                }],
                            },
                            stss: Some(Stss {
                                entries: self.sync.clone(),
                            }),
                            stsc: Stsc {
                                entries: vec![StscEntry {
                                    first_chunk: 1,
                                    samples_per_chunk: self.sizes.len() as u32,
                                    sample_description_index: 1,
                                }],
                            },
                            stsz: Stsz {
                                samples: StszSamples::Different {
                                    sizes: self.sizes.clone(),
                                },
                            },
                            stco: Some(Stco {
                                entries: vec![chunk_offset],
                            }),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                },
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

/// The NAL unit after its Annex B start code; `None` without one or when nothing follows.
fn strip_start_code(nal: &[u8]) -> Option<&[u8]> {
    let body = nal
        .strip_prefix(&[0, 0, 0, 1])
        .or_else(|| nal.strip_prefix(&[0, 0, 1]))?;
    (!body.is_empty()).then_some(body)
}

/// Keeps the first SPS or PPS; OpenH264 repeats the same one before each IDR picture.
fn set_parameter_set(slot: &mut Option<Vec<u8>>, nal: &[u8]) -> ServiceResult<()> {
    match slot {
        None => *slot = Some(nal.to_vec()),
        Some(known) if known.as_slice() == nal => {}
        Some(_) => {
            return Err(ServiceError::Internal(
                "H.264 parameter sets changed within one video".into(),
            ))
        }
    }
    Ok(())
}

fn encode_gif(frames: &Frames, fps: u32) -> ServiceResult<(u32, u32, Vec<u8>)> {
    if !(1..=GIF_MAX_FPS).contains(&fps) {
        return Err(ServiceError::invalid(
            "fps",
            format!("must be 1 to {GIF_MAX_FPS} for GIF, got {fps}"),
        ));
    }
    for (field, edge) in [("width", frames.width), ("height", frames.height)] {
        if edge > u32::from(u16::MAX) {
            return Err(ServiceError::invalid(
                field,
                format!("GIF takes at most {} pixels, got {edge}", u16::MAX),
            ));
        }
    }
    let gif_error =
        |e: image::ImageError| ServiceError::Internal(format!("GIF encoding failed: {e}"));
    let mut data = Vec::new();
    // The encoder writes the GIF trailer when dropped, so it lives in this block.
    {
        let mut encoder = GifEncoder::new_with_speed(&mut data, GIF_QUANTIZER_SPEED);
        encoder.set_repeat(Repeat::Infinite).map_err(gif_error)?;
        for (i, rgb) in frames.frames.iter().enumerate() {
            let rgba = rgb
                .chunks_exact(3)
                .flat_map(|p| [p[0], p[1], p[2], u8::MAX])
                .collect();
            let image =
                RgbaImage::from_raw(frames.width, frames.height, rgba).ok_or_else(|| {
                    ServiceError::Internal("pixel buffer does not match frame size".into())
                })?;
            // At most 100 cs (at 1 fps).
            let delay = (centiseconds(i + 1, fps) - centiseconds(i, fps)) as u32;
            let delay = Delay::from_numer_denom_ms(delay * 10, 1);
            encoder
                .encode_frame(Frame::from_parts(image, 0, 0, delay))
                .map_err(gif_error)?;
        }
    }
    Ok((frames.width, frames.height, data))
}

/// When frame `index` starts, rounded to GIF's centiseconds: delays then alternate (13, 12, 13, …
/// at 8 fps) so the whole stays on time.
fn centiseconds(index: usize, fps: u32) -> u64 {
    let fps = u64::from(fps);
    (200 * index as u64 + fps) / (2 * fps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mp4_atom::{Codec, Decode};
    use openh264::decoder::Decoder;
    use openh264::formats::YUVSource;

    /// A smooth clip: diagonal colour gradients under a soft-edged square moving right.
    fn clip(width: u32, height: u32, count: usize) -> Frames {
        let (w, h) = (width as f32, height as f32);
        let frames = (0..count)
            .map(|t| {
                let centre = (w * (0.25 + 0.5 * t as f32 / count as f32), h / 2.0);
                let mut rgb = Vec::with_capacity((width * height * 3) as usize);
                for y in 0..height {
                    for x in 0..width {
                        let (fx, fy) = (x as f32 / w, y as f32 / h);
                        let d = ((x as f32 - centre.0).abs()).max((y as f32 - centre.1).abs());
                        let inside = (1.0 - (d - w / 8.0) / 4.0).clamp(0.0, 1.0);
                        let base = [40.0 + 160.0 * fx, 40.0 + 160.0 * fy, 200.0 - 120.0 * fx];
                        let square = [230.0, 200.0, 60.0];
                        rgb.extend(
                            (0..3).map(|c| (base[c] + inside * (square[c] - base[c])) as u8),
                        );
                    }
                }
                rgb
            })
            .collect();
        Frames {
            width,
            height,
            frames,
        }
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        let se: f64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum();
        10.0 * (255.0f64.powi(2) * a.len() as f64 / se.max(1e-9)).log10()
    }

    /// The boxes in fast-start order, and each sample's bytes found through `stco` and `stsz`.
    fn parse_mp4(data: &[u8]) -> (Moov, Vec<&[u8]>) {
        let mut buf = data;
        let ftyp = Ftyp::decode(&mut buf).unwrap();
        assert_eq!(ftyp.major_brand, FourCC::new(b"isom"));
        let moov = Moov::decode(&mut buf).unwrap();
        let payload_start = data.len() - buf.len() + 8;
        let mdat = Mdat::decode(&mut buf).unwrap();
        assert!(buf.is_empty(), "nothing follows mdat");
        let stbl = &moov.trak[0].mdia.minf.stbl;
        let offset = stbl.stco.as_ref().unwrap().entries[0] as usize;
        assert_eq!(offset, payload_start, "the chunk starts the mdat payload");
        let StszSamples::Different { sizes } = &stbl.stsz.samples else {
            panic!("sample sizes listed one by one")
        };
        assert_eq!(sizes.iter().sum::<u32>() as usize, mdat.data.len());
        let mut at = offset;
        let samples = sizes
            .iter()
            .map(|&size| {
                let sample = &data[at..at + size as usize];
                at += size as usize;
                sample
            })
            .collect();
        (moov, samples)
    }

    fn avcc(moov: &Moov) -> &Avc1 {
        match &moov.trak[0].mdia.minf.stbl.stsd.codecs[..] {
            [Codec::Avc1(avc1)] => avc1,
            other => panic!("one avc1 sample entry, got {other:?}"),
        }
    }

    /// Decodes the samples with OpenH264's decoder (after the `avcC` parameter sets, as Annex B)
    /// into `(width, height, rgb)` frames.
    fn decode_h264(avc1: &Avc1, samples: &[&[u8]]) -> Vec<(usize, usize, Vec<u8>)> {
        let annex_b = |nal: &[u8]| [&[0, 0, 0, 1], nal].concat();
        let mut decoder = Decoder::new().unwrap();
        let parameter_sets: Vec<u8> = (avc1.avcc.sequence_parameter_sets.iter())
            .chain(&avc1.avcc.picture_parameter_sets)
            .flat_map(|nal| annex_b(nal))
            .collect();
        assert!(decoder.decode(&parameter_sets).unwrap().is_none());
        let rgb = |yuv: openh264::decoder::DecodedYUV<'_>| {
            let (w, h) = yuv.dimensions();
            let mut rgb = vec![0; w * h * 3];
            yuv.write_rgb8(&mut rgb);
            (w, h, rgb)
        };
        let mut decoded = Vec::new();
        for sample in samples {
            let (mut rest, mut packet) = (*sample, Vec::new());
            while !rest.is_empty() {
                let (len, tail) = rest.split_at(4);
                let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
                packet.extend(annex_b(&tail[..len]));
                rest = &tail[len..];
            }
            decoded.extend(decoder.decode(&packet).unwrap().map(rgb));
        }
        decoded.extend(decoder.flush_remaining().unwrap().into_iter().map(rgb));
        decoded
    }

    #[test]
    fn mp4_decodes_back_to_the_frames_with_exact_timing() {
        let input = clip(64, 48, 9);
        let video = encode_video(&input, 8, VideoFormat::Mp4).unwrap();
        assert_eq!(
            (
                video.format,
                video.width,
                video.height,
                video.frames,
                video.fps
            ),
            (VideoFormat::Mp4, 64, 48, 9, 8)
        );
        let (moov, samples) = parse_mp4(&video.data);
        let trak = &moov.trak[0];
        let stbl = &trak.mdia.minf.stbl;
        // 9 frames at 8 fps: 1.125 s in every header, one tick count per frame.
        let seconds = |duration: u64, timescale: u32| duration as f64 / f64::from(timescale);
        assert_eq!(seconds(moov.mvhd.duration, moov.mvhd.timescale), 1.125);
        assert_eq!(
            seconds(trak.mdia.mdhd.duration, trak.mdia.mdhd.timescale),
            1.125
        );
        assert_eq!(seconds(trak.tkhd.duration, moov.mvhd.timescale), 1.125);
        assert_eq!(
            stbl.stts.entries,
            [SttsEntry {
                sample_count: 9,
                sample_delta: trak.mdia.mdhd.timescale / 8,
            }]
        );
        assert_eq!(trak.mdia.hdlr.handler, FourCC::new(b"vide"));
        assert_eq!(
            (trak.tkhd.width.integer(), trak.tkhd.height.integer()),
            (64, 48)
        );
        let avc1 = avcc(&moov);
        assert_eq!((avc1.visual.width, avc1.visual.height), (64, 48));
        assert_eq!(avc1.avcc.avc_profile_indication, 66, "constrained baseline");
        assert_eq!(
            stbl.stss.as_ref().unwrap().entries[0],
            1,
            "starts on an IDR"
        );
        assert_eq!(samples.len(), 9);

        let decoded = decode_h264(avc1, &samples);
        assert_eq!(decoded.len(), 9);
        for ((w, h, rgb), original) in decoded.iter().zip(&input.frames) {
            assert_eq!((*w, *h), (64, 48));
            let quality = psnr(rgb, original);
            assert!(quality > 30.0, "PSNR {quality:.1} dB");
        }
    }

    #[test]
    fn mp4_pads_odd_sizes_and_takes_a_single_frame() {
        // The right column and bottom row carry a colour of their own, so the padding shows.
        let mut input = clip(33, 17, 1);
        for (i, px) in input.frames[0].chunks_exact_mut(3).enumerate() {
            if i % 33 == 32 || i / 33 == 16 {
                px.copy_from_slice(&[250, 20, 20]);
            }
        }
        let video = encode_video(&input, 24, VideoFormat::Mp4).unwrap();
        assert_eq!((video.width, video.height, video.frames), (34, 18, 1));
        let (moov, samples) = parse_mp4(&video.data);
        assert_eq!(
            moov.trak[0].mdia.minf.stbl.stss.as_ref().unwrap().entries,
            [1]
        );
        let decoded = decode_h264(avcc(&moov), &samples);
        assert_eq!(decoded.len(), 1);
        let (w, h, rgb) = &decoded[0];
        assert_eq!((*w, *h), (34, 18));
        // The padded corner repeats the red edge.
        let corner = &rgb[(17 * 34 + 33) * 3..][..3];
        assert!(corner[0] > 180 && corner[1] < 90, "corner {corner:?}");
    }

    #[test]
    fn refusals_name_the_field() {
        let field = |result: ServiceResult<EncodedVideo>| match result {
            Err(ServiceError::InvalidArgument { field, .. }) => field,
            other => panic!("expected an invalid argument, got {other:?}"),
        };
        let tiny = clip(8, 16, 2);
        assert_eq!(field(encode_video(&tiny, 8, VideoFormat::Mp4)), "width");
        assert_eq!(
            field(encode_video(&clip(16, 15, 2), 8, VideoFormat::Mp4)),
            "height"
        );
        let wide = Frames {
            width: 4000,
            height: 16,
            frames: vec![vec![0; 4000 * 16 * 3]],
        };
        assert_eq!(field(encode_video(&wide, 8, VideoFormat::Mp4)), "width");
        let ok = clip(16, 16, 2);
        assert_eq!(field(encode_video(&ok, 0, VideoFormat::Mp4)), "fps");
        assert_eq!(field(encode_video(&ok, 121, VideoFormat::Mp4)), "fps");
        assert_eq!(field(encode_video(&ok, 51, VideoFormat::Gif)), "fps");
        // GIF takes what H.264 cannot.
        let gif = encode_video(&tiny, 8, VideoFormat::Gif).unwrap();
        assert_eq!((gif.width, gif.height, gif.frames), (8, 16, 2));
    }

    #[test]
    fn malformed_frames_are_internal_errors() {
        let internal = |frames: &Frames| {
            matches!(
                encode_video(frames, 8, VideoFormat::Mp4),
                Err(ServiceError::Internal(_))
            )
        };
        assert!(internal(&Frames {
            frames: vec![],
            ..clip(16, 16, 1)
        }));
        let mut short = clip(16, 16, 3);
        short.frames[2].pop();
        assert!(internal(&short));
        assert!(internal(&Frames {
            width: 0,
            height: 16,
            frames: vec![vec![]],
        }));
        assert!(frames_strip(&short, 2).is_err());
    }

    #[test]
    fn gif_round_trips_frames_size_and_timing() {
        use image::codecs::gif::GifDecoder;
        use image::AnimationDecoder;

        // More pixels than a palette has colours, so quantisation is part of the round trip.
        let input = clip(48, 32, 9);
        let video = encode_video(&input, 8, VideoFormat::Gif).unwrap();
        assert_eq!(
            (video.format, video.width, video.height, video.frames),
            (VideoFormat::Gif, 48, 32, 9)
        );
        let decoder = GifDecoder::new(std::io::Cursor::new(&video.data)).unwrap();
        let frames = decoder.into_frames().collect_frames().unwrap();
        assert_eq!(frames.len(), 9);
        let mut millis = Vec::new();
        for (frame, original) in frames.iter().zip(&input.frames) {
            let rgba = frame.buffer();
            assert_eq!(rgba.dimensions(), (48, 32));
            let rgb: Vec<u8> = rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect();
            let quality = psnr(&rgb, original);
            assert!(quality > 25.0, "PSNR {quality:.1} dB");
            let (numer, denom) = frame.delay().numer_denom_ms();
            millis.push(numer / denom);
        }
        // 125 ms a frame, in centiseconds that alternate so 9 frames last 1.13 s.
        assert_eq!(millis, [130, 120, 130, 120, 130, 120, 130, 120, 130]);
    }

    #[test]
    fn strip_samples_frames_evenly_side_by_side() {
        let frames = Frames {
            width: 3,
            height: 2,
            frames: (0..5).map(|i| vec![i as u8 * 10; 18]).collect(),
        };
        let strip = frames_strip(&frames, 3).unwrap();
        assert_eq!((strip.width, strip.height, strip.frames.len()), (9, 2, 1));
        // Frames 0, 2 and 4, three pixels each, on both rows.
        let slot = |x: usize, y: usize| strip.frames[0][(y * 9 + x) * 3];
        for y in 0..2 {
            let row: Vec<u8> = (0..9).map(|x| slot(x, y)).collect();
            assert_eq!(row, [0, 0, 0, 20, 20, 20, 40, 40, 40]);
        }
        let all = frames_strip(&frames, 10).unwrap();
        assert_eq!(all.width, 15, "no more frames than there are");
        let two = frames_strip(&frames, 2).unwrap();
        assert_eq!(
            (two.frames[0][0], two.frames[0][3 * 3]),
            (0, 40),
            "first and last"
        );
        let one = frames_strip(&frames, 0).unwrap();
        assert_eq!((one.width, one.frames[0].clone()), (3, vec![0; 18]));
        // The strip goes through the image encoder as any frame does.
        let png = super::super::encode_image(strip, crate::dit::request::ImageFormat::Png, 0);
        assert_eq!(png.unwrap().width, 9);
    }

    /// Checks the files with ffmpeg, which browsers' demuxers agree with: run with
    /// `cargo test -p denoised-server --lib media -- --ignored` where ffmpeg and ffprobe are installed.
    #[test]
    #[ignore = "needs ffmpeg and ffprobe on PATH"]
    fn ffmpeg_accepts_mp4_and_gif() {
        use std::process::Command;

        let input = clip(64, 64, 9);
        for (format, ext) in [(VideoFormat::Mp4, "mp4"), (VideoFormat::Gif, "gif")] {
            let video = encode_video(&input, 8, format).unwrap();
            let path = std::env::temp_dir()
                .join(format!("denoised-video-test-{}.{ext}", std::process::id()));
            std::fs::write(&path, &video.data).unwrap();
            let probe = Command::new("ffprobe")
                .args(["-v", "error", "-select_streams", "v:0", "-count_frames"])
                .args([
                    "-show_entries",
                    "stream=codec_name,pix_fmt,width,height,r_frame_rate,nb_read_frames",
                ])
                .args(["-of", "default=noprint_wrappers=1"])
                .arg(&path)
                .output()
                .unwrap();
            let decode = Command::new("ffmpeg")
                .args(["-v", "error", "-xerror", "-i"])
                .arg(&path)
                .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
                .output()
                .unwrap();
            std::fs::remove_file(&path).unwrap();
            let probe = String::from_utf8(probe.stdout).unwrap();
            let expected = match format {
                VideoFormat::Mp4 => "codec_name=h264\nwidth=64\nheight=64\npix_fmt=yuv420p\nr_frame_rate=8/1\nnb_read_frames=9\n",
                VideoFormat::Gif => "codec_name=gif\nwidth=64\nheight=64\npix_fmt=bgra\nr_frame_rate=8/1\nnb_read_frames=9\n",
            };
            assert_eq!(probe, expected, "{ext}");
            assert!(
                decode.status.success(),
                "{ext}: {}",
                String::from_utf8_lossy(&decode.stderr)
            );
            assert!(
                decode.stderr.is_empty(),
                "{ext}: {}",
                String::from_utf8_lossy(&decode.stderr)
            );
            assert_eq!(decode.stdout.len(), 9 * 64 * 64 * 3, "{ext}");
        }
    }
}
