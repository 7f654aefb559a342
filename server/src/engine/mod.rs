//! The inference engine: one thread per device that owns the models and every running
//! generation, and advances them one denoising step at a time in turn, so concurrent streams
//! progress together. libtorch tensors are `Send` but not `Sync`, so they never leave this thread;
//! the async side talks to it through a channel.
//!
//! Each turn of the loop admits new jobs, then gives every running generation (whose client keeps
//! up with its stream) one step. Batching compatible steps of different sessions would slot in
//! where a turn collects the generations to step.
pub mod device;
pub mod events;
mod generation;
pub mod model;
pub mod run;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::dit::request::{GenerationRequest, ImageFormat, PreviewPlan, VideoPlan};
use crate::error::{ServiceError, ServiceResult};
use crate::session::GenerationGuard;
pub use events::EventSender;
use generation::Running;
pub use model::{LoadedModel, ServedModel};

/// One generation request, validated and resolved by the API layer.
pub struct Job {
    pub generation_id: String,
    /// Declared before `events` so that it drops first: the session is free again (and counts
    /// the generation) before its client sees the stream end.
    pub guard: GenerationGuard,
    pub model: String,
    pub request: GenerationRequest,
    pub preview: PreviewPlan,
    pub output_format: ImageFormat,
    /// Video models: how the video is returned.
    pub video: Option<VideoPlan>,
    pub events: EventSender,
    /// The request's span: step spans are its children.
    pub span: tracing::Span,
    pub received: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineStartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model `{name}` failed to load: {message}")]
    Model { name: String, message: String },
    #[error("the engine thread stopped during start-up")]
    Died,
}

/// The async side's handle on the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    models: Arc<Vec<ServedModel>>,
    active: Arc<AtomicUsize>,
    max_active: usize,
    stream_buffer: usize,
}

impl EngineHandle {
    /// Starts the engine thread and loads every configured model on it.
    pub fn start(config: &Config) -> Result<Self, EngineStartError> {
        let device = device::parse_device(&config.device)?;
        let kind = device::parse_dtype(&config.dtype, device)?;
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let entries = config.models.clone();
        let skip_bad = config.skip_bad_models;
        let active = Arc::new(AtomicUsize::new(0));
        let active_in_thread = active.clone();
        std::thread::Builder::new()
            .name("denoised-engine".into())
            .spawn(move || {
                // Grad mode is thread-local: inference never records autograd graphs here.
                let _no_grad = tch::no_grad_guard();
                let mut models = Vec::new();
                for entry in &entries {
                    let started = Instant::now();
                    match LoadedModel::load(entry, device, kind) {
                        Ok(m) => {
                            tracing::info!(model = %entry.name, path = %entry.path.display(),
                                load_ms = started.elapsed().as_millis() as u64, "model loaded");
                            models.push(m);
                        }
                        Err(e) if skip_bad => {
                            tracing::error!(model = %entry.name, error = %e, "model skipped: failed to load");
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(EngineStartError::Model {
                                name: entry.name.clone(),
                                message: e.to_string(),
                            }));
                            return;
                        }
                    }
                }
                let served = models.iter().map(|m| m.info.clone()).collect();
                if ready_tx.send(Ok(served)).is_err() {
                    return;
                }
                Engine {
                    models,
                    jobs: jobs_rx,
                    running: VecDeque::new(),
                    active: active_in_thread,
                }
                .run();
            })
            .map_err(|_| EngineStartError::Died)?;
        let served = ready_rx.recv().map_err(|_| EngineStartError::Died)??;
        Ok(Self {
            jobs: jobs_tx,
            models: Arc::new(served),
            active,
            max_active: config.limits.max_active_generations,
            stream_buffer: config.limits.stream_buffer,
        })
    }

    pub fn models(&self) -> &[ServedModel] {
        &self.models
    }

    pub fn model(&self, name: &str) -> ServiceResult<&ServedModel> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ServiceError::ModelNotFound(name.to_owned()))
    }

    /// Buffer size for a generation's event channel.
    pub fn stream_buffer(&self) -> usize {
        self.stream_buffer
    }

    /// Queues a generation; refused when the engine already holds its maximum.
    pub fn submit(&self, job: Job) -> ServiceResult<()> {
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.max_active {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return Err(ServiceError::ResourceExhausted(format!(
                "the engine is running its maximum of {} generations; retry later",
                self.max_active
            )));
        }
        self.jobs.send(job).map_err(|_| {
            self.active.fetch_sub(1, Ordering::AcqRel);
            ServiceError::EngineStopped
        })
    }
}

struct Engine {
    models: Vec<LoadedModel>,
    jobs: mpsc::Receiver<Job>,
    running: VecDeque<Running>,
    active: Arc<AtomicUsize>,
}

impl Engine {
    fn run(mut self) {
        loop {
            if self.running.is_empty() {
                // Idle: block until work arrives (or every handle is gone).
                match self.jobs.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.jobs.try_recv() {
                self.admit(job);
            }
            let mut progressed = false;
            for _ in 0..self.running.len() {
                let Some(mut gen) = self.running.pop_front() else {
                    break;
                };
                let model = &self.models[gen.model_index];
                let outcome = gen.turn(model);
                progressed |= outcome.progressed;
                if outcome.finished {
                    self.active.fetch_sub(1, Ordering::AcqRel);
                } else {
                    self.running.push_back(gen);
                }
            }
            if !progressed && !self.running.is_empty() {
                // Every running generation waits for its client to read: don't spin.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn admit(&mut self, job: Job) {
        let Some(index) = self.models.iter().position(|m| m.info.name == job.model) else {
            let _ = job
                .events
                .try_send(Err(ServiceError::ModelNotFound(job.model.clone())));
            self.active.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        match Running::start(job, index, &self.models[index]) {
            Some(gen) => self.running.push_back(gen),
            None => {
                self.active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}
