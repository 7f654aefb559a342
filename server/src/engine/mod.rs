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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::dit::request::{GenerationRequest, ImageFormat, PreviewPlan, VideoPlan};
use crate::error::{echo, ServiceError, ServiceResult};
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
    /// Step events carry the per-module decision record.
    pub record_modules: bool,
    pub output_format: ImageFormat,
    /// Video models: how the video is returned.
    pub video: Option<VideoPlan>,
    pub events: EventSender,
    /// The request's span: step spans are its children.
    pub span: tracing::Span,
    pub received: Instant,
    /// The call's deadline (`grpc-timeout`): past it the generation ends DEADLINE_EXCEEDED.
    pub deadline: Option<Instant>,
}

/// What the async side and the engine thread share.
#[derive(Debug)]
pub(crate) struct EngineShared {
    /// Generations admitted (queued or running); each holds one until it is released.
    pub active: AtomicUsize,
    /// Shutdown: running generations end with UNAVAILABLE at their next turn.
    pub stopping: AtomicBool,
    /// See [`Limits::stalled_stream_timeout_secs`](crate::config::Limits).
    pub stalled_stream_timeout: Duration,
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
    shared: Arc<EngineShared>,
    max_active: usize,
    max_queued: usize,
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
        let default_budget = config.limits.admission_budget;
        let max_running = config.limits.max_active_generations;
        let shared = Arc::new(EngineShared {
            active: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            stalled_stream_timeout: Duration::from_secs(config.limits.stalled_stream_timeout_secs),
        });
        let shared_in_thread = shared.clone();
        std::thread::Builder::new()
            .name("denoised-engine".into())
            .spawn(move || {
                // Grad mode is thread-local: inference never records autograd graphs here.
                let _no_grad = tch::no_grad_guard();
                let mut models = Vec::new();
                let mut budgets = Vec::new();
                for entry in &entries {
                    let started = Instant::now();
                    match LoadedModel::load(entry, device, kind) {
                        Ok(m) => {
                            tracing::info!(model = %entry.name, path = %entry.path.display(),
                                load_ms = started.elapsed().as_millis() as u64, "model loaded");
                            models.push(m);
                            budgets.push(entry.admission_budget.unwrap_or(default_budget));
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
                    budgets,
                    jobs: jobs_rx,
                    waiting: VecDeque::new(),
                    running: Vec::new(),
                    max_running,
                    shared: shared_in_thread,
                }
                .run();
            })
            .map_err(|_| EngineStartError::Died)?;
        let served = ready_rx.recv().map_err(|_| EngineStartError::Died)??;
        Ok(Self {
            jobs: jobs_tx,
            models: Arc::new(served),
            shared,
            max_active: config.limits.max_active_generations,
            max_queued: config.limits.max_queued_generations,
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
            .ok_or_else(|| ServiceError::ModelNotFound(echo(name)))
    }

    /// Buffer size for a generation's event channel.
    pub fn stream_buffer(&self) -> usize {
        self.stream_buffer
    }

    /// Generations admitted and not yet released (queued or running).
    pub fn active_generations(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Ends every running and queued generation at its next turn with UNAVAILABLE (jobs
    /// submitted after this are ended when the engine takes them from the queue).
    pub fn stop_generations(&self) {
        self.shared.stopping.store(true, Ordering::Release);
    }

    /// Queues a generation; refused when the engine already holds its maximum.
    pub fn submit(&self, job: Job) -> ServiceResult<()> {
        let active = &self.shared.active;
        if active.fetch_add(1, Ordering::AcqRel) >= self.max_active + self.max_queued {
            active.fetch_sub(1, Ordering::AcqRel);
            return Err(ServiceError::ResourceExhausted(format!(
                "the engine is running its maximum of {} generations (limits.max_active_generations) \
                 and {} more are queued (limits.max_queued_generations); retry later",
                self.max_active, self.max_queued
            )));
        }
        self.jobs.send(job).map_err(|_| {
            active.fetch_sub(1, Ordering::AcqRel);
            ServiceError::EngineStopped
        })
    }
}

struct Engine {
    models: Vec<LoadedModel>,
    /// Per model: pixel-steps admitted at once.
    budgets: Vec<u64>,
    jobs: mpsc::Receiver<Job>,
    /// Admitted by `submit`, waiting for room (FIFO).
    waiting: VecDeque<Job>,
    running: Vec<Running>,
    max_running: usize,
    shared: Arc<EngineShared>,
}

/// A request's size for admission: pixel-steps (width × height × frames × steps).
fn cost(request: &GenerationRequest) -> u64 {
    let frames = request.num_frames.unwrap_or(1).max(1) as u64;
    request.width as u64 * request.height as u64 * frames * request.steps as u64
}

impl Engine {
    /// The scheduler. Each pass takes new jobs into the queue, starts queued ones that fit (FIFO:
    /// at most `max_running` at once, and per model the admission budget), serves every running
    /// generation (delivers its events, ends it if cancelled, past its deadline, stalled or
    /// stopped), and runs one step of the ready generation that has had the least engine time.
    ///
    /// Least-served-first is what keeps small requests responsive next to a large one: a 64²
    /// step costs milliseconds and a 1024² step seconds, so after each large step the small
    /// generations run until they have caught up in engine time. A ready generation therefore
    /// waits at most for the one step already running (steps are not preempted): its latency is
    /// bounded by the longest single step of the others, whatever their number of steps.
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                // Idle: block until work arrives (or every handle is gone).
                match self.jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.jobs.try_recv() {
                self.waiting.push_back(job);
            }
            self.admit_waiting();
            // A finished generation is dropped, which frees its session and slot.
            let models = &self.models;
            self.running
                .retain_mut(|gen| !gen.service(&models[gen.model_index]));
            let next = self
                .running
                .iter_mut()
                .filter(|gen| gen.ready())
                .min_by_key(|gen| gen.served());
            match next {
                Some(gen) => gen.advance(&self.models[gen.model_index]),
                // Every running generation waits for its client to read: don't spin.
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Starts queued jobs in order while they fit; refuses those whose model is unknown and
    /// ends those cancelled, abandoned or past their deadline while they waited.
    fn admit_waiting(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            let job = &self.waiting[i];
            let gone = job.events.is_closed();
            let ended = generation::ended_early(job, &self.shared, || "while it was queued".into());
            if gone || ended.is_some() {
                let job = self.waiting.remove(i).expect("index in range");
                let error = ended.unwrap_or(ServiceError::Cancelled);
                generation::refuse(job, &self.shared, error);
                continue;
            }
            i += 1;
        }
        while let Some(job) = self.waiting.front() {
            let Some(index) = self.models.iter().position(|m| m.info.name == job.model) else {
                let job = self.waiting.pop_front().expect("front exists");
                let error = ServiceError::ModelNotFound(echo(&job.model));
                generation::refuse(job, &self.shared, error);
                continue;
            };
            if !self.fits(index, cost(&job.request)) {
                // FIFO: a large request at the head is not overtaken (it would starve).
                return;
            }
            let job = self.waiting.pop_front().expect("front exists");
            if let Some(mut gen) = Running::start(job, index, &self.models[index], &self.shared) {
                let least = self.running.iter().map(Running::served).min();
                gen.level_with(least.unwrap_or_default());
                // First in line: on a tie with the least-served, the newcomer steps first.
                self.running.insert(0, gen);
            }
        }
    }

    /// Whether a request of `cost` pixel-steps for model `index` may start now.
    fn fits(&self, index: usize, cost: u64) -> bool {
        if self.running.len() >= self.max_running {
            return false;
        }
        let same_model = self.running.iter().filter(|g| g.model_index == index);
        let admitted: u64 = same_model.clone().map(Running::cost).sum();
        // Larger than the whole budget: alone on its model.
        same_model.count() == 0 || admitted + cost <= self.budgets[index]
    }
}
