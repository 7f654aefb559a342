//! Typed async client for **denoised**, a gRPC server that runs diffusion transformers with
//! training-free step caches (Pyramid Attention Broadcast, FasterCache, TaylorSeer, First Block
//! Cache, MagCache).
//!
//! ```no_run
//! use denoised_client::{CacheConfig, Client, Event, GenerateRequest, Preview};
//! use futures::StreamExt;
//!
//! # async fn demo() -> denoised_client::Result<()> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let session = client
//!     .create_session("flux-dev")
//!     .cache(CacheConfig::parse("taylorseer:cache_interval=5,max_order=1")?)
//!     .await?;
//! let mut stream = session
//!     .generate(GenerateRequest::new("a red fox").steps(28).seed(7).preview(Preview::latent_rgb()))
//!     .await?;
//! while let Some(event) = stream.next().await {
//!     match event? {
//!         Event::Started(s) => println!("seed {}", s.settings.seed),
//!         Event::Step(step) => println!("{}/{} {}", step.index + 1, step.total, step.cache),
//!         Event::Completed(done) => done.image.save("fox.png")?,
//!     }
//! }
//! session.close().await?;
//! # Ok(()) }
//! ```
//!
//! Video models (see [`ModelInfo::modality`]) return the video, its first frame as `image`, and
//! on request every frame:
//!
//! ```no_run
//! # use denoised_client::{CacheConfig, Client, GenerateRequest};
//! # async fn demo(client: Client) -> denoised_client::Result<()> {
//! let request = GenerateRequest::new("waves at night").num_frames(49).return_frames(true);
//! let done = client
//!     .generate_once("cogvideox-2b", CacheConfig::None, request)
//!     .await?
//!     .collect_final()
//!     .await?;
//! if let Some(video) = &done.video {
//!     video.save("waves.mp4")?;
//! }
//! done.save_frames("frames")?;
//! # Ok(()) }
//! ```
//!
//! The public API uses its own types; each converts to and from the generated protobuf types
//! (re-exported as [`proto`]) for use with the raw tonic client.
#![warn(missing_docs)]

mod cache;
mod client;
mod error;
mod events;
mod image;
mod info;
mod request;
mod trace;
mod video;

pub use cache::{
    AttentionWeight, CacheConfig, CacheKind, FactorDtype, FasterCacheConfig, FirstBlockCacheConfig,
    MagCacheConfig, ParseCacheConfigError, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig,
};
pub use client::{Client, Session, SessionBuilder};
pub use error::{Error, Result};
pub use events::{
    CacheActivity, Completed, Event, ForwardDecisions, ForwardRows, GenerationStream, ModuleCounts,
    ModuleDecision, ResolvedSettings, Started, StepEvent,
};
pub use image::Image;
pub use info::{Conditioning, Modality, ModelInfo, SessionInfo, VideoLimits};
pub use request::{GenerateRequest, ImageFormat, Preview, PreviewMode, VideoFormat};
pub use trace::TraceParent;
pub use video::Video;

/// The generated protobuf types and raw gRPC client (`denoised.v1`), for advanced use.
pub use denoised_proto::v1 as proto;
/// The tonic version this crate is built on (for interceptors and custom channels).
pub use tonic;
