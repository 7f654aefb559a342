//! The connection ([`Client`]) and session handles ([`Session`], [`SessionBuilder`]).

use std::collections::BTreeMap;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use denoised_proto::v1;
use denoised_proto::v1::denoiser_client::DenoiserClient;
use futures::future::BoxFuture;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::cache::CacheConfig;
use crate::error::{Error, Result};
use crate::events::GenerationStream;
use crate::info::{ModelInfo, SessionInfo};
use crate::request::GenerateRequest;
use crate::trace::TraceParent;

/// Final images can be large (a 2048² PNG is well over tonic's 4 MiB default).
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type InterceptorFn = dyn Fn(Request<()>) -> Result<Request<()>, Status> + Send + Sync;

/// The interceptors registered with [`Client::with_interceptor`], run in order.
#[derive(Clone, Default)]
struct Interceptors(Vec<Arc<InterceptorFn>>);

impl tonic::service::Interceptor for Interceptors {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        for interceptor in &self.0 {
            request = interceptor(request)?;
        }
        Ok(request)
    }
}

type Rpc = DenoiserClient<InterceptedService<Channel, Interceptors>>;

/// A connection to a denoised server. Cheap to clone; clones share the HTTP/2 connection.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    interceptors: Interceptors,
    timeout: Option<Duration>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("interceptors", &self.interceptors.0.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `url`, e.g. `http://127.0.0.1:50051` (`http://` is assumed when no scheme is
    /// given). Fails when the server cannot be reached within 10 seconds.
    pub async fn connect(url: impl Into<String>) -> Result<Client> {
        let mut url = url.into();
        if !url.contains("://") {
            url.insert_str(0, "http://");
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::invalid(format!("invalid server url {url:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint.connect().await?;
        tracing::debug!(%url, "connected to denoised server");
        Ok(Client::from_channel(channel))
    }

    /// A client over an existing channel (custom TLS, lazy connection, a test transport...).
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            channel,
            interceptors: Interceptors::default(),
            timeout: None,
        }
    }

    /// Adds an interceptor that sees (and may modify or reject) the metadata of every request,
    /// e.g. to add an authorization header. Interceptors run in the order they were added.
    pub fn with_interceptor<F>(mut self, interceptor: F) -> Client
    where
        F: Fn(Request<()>) -> Result<Request<()>, Status> + Send + Sync + 'static,
    {
        self.interceptors.0.push(Arc::new(interceptor));
        self
    }

    /// Sends a W3C `traceparent` header with every request, taken from `current` at call time
    /// (no header when it returns `None`). This is the hook for OpenTelemetry: return the
    /// current span's context, and the server's spans join the caller's trace.
    pub fn with_traceparent<F>(self, current: F) -> Client
    where
        F: Fn() -> Option<TraceParent> + Send + Sync + 'static,
    {
        self.with_interceptor(move |mut request| {
            if let Some(traceparent) = current() {
                let value = MetadataValue::try_from(traceparent.to_string())
                    .map_err(|e| Status::internal(format!("traceparent header: {e}")))?;
                request.metadata_mut().insert(TraceParent::HEADER, value);
            }
            Ok(request)
        })
    }

    /// A deadline for each unary call (everything but `generate`), sent to the server as
    /// `grpc-timeout` and enforced by the client too; a late call fails with `DeadlineExceeded`.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    fn rpc(&self) -> Rpc {
        DenoiserClient::with_interceptor(self.channel.clone(), self.interceptors.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Runs one unary call under the configured deadline (tonic's channel enforces the
    /// `grpc-timeout` it sends; see `From<Status> for Error` for the code).
    async fn unary<M, T, F, Fut>(&self, message: M, call: F) -> Result<T>
    where
        F: FnOnce(Rpc, Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut request = Request::new(message);
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        Ok(call(self.rpc(), request).await?.into_inner())
    }

    /// The models the server serves.
    pub async fn list_models(&self) -> Result<Vec<ModelInfo>> {
        let response = self
            .unary(v1::ListModelsRequest {}, |mut rpc, r| async move {
                rpc.list_models(r).await
            })
            .await?;
        Ok(response.models.into_iter().map(ModelInfo::from).collect())
    }

    /// Starts building a session on `model`; `.await` the builder to create it.
    ///
    /// ```no_run
    /// # async fn demo(client: denoised_client::Client) -> denoised_client::Result<()> {
    /// use denoised_client::CacheConfig;
    /// let session = client
    ///     .create_session("flux-dev")
    ///     .cache(CacheConfig::parse("fbc:threshold=0.12")?)
    ///     .label("user", "ada")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn create_session(&self, model: impl Into<String>) -> SessionBuilder {
        SessionBuilder {
            client: self.clone(),
            model: model.into(),
            cache: CacheConfig::None,
            idle_timeout: Duration::ZERO,
            labels: BTreeMap::new(),
        }
    }

    /// A handle on an existing session id (no round trip; [`Session::info`] checks it exists).
    pub fn session(&self, id: impl Into<String>) -> Session {
        Session {
            client: self.clone(),
            id: id.into().into(),
        }
    }

    /// All open sessions.
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        let response = self
            .unary(v1::ListSessionsRequest {}, |mut rpc, r| async move {
                rpc.list_sessions(r).await
            })
            .await?;
        Ok(response
            .sessions
            .into_iter()
            .map(SessionInfo::from)
            .collect())
    }

    /// Runs one generation on an ephemeral session with `cache`, closed when it ends.
    pub async fn generate_once(
        &self,
        model: impl Into<String>,
        cache: impl Into<CacheConfig>,
        request: GenerateRequest,
    ) -> Result<GenerationStream> {
        let model = model.into();
        if model.is_empty() {
            return Err(Error::invalid("model name is empty"));
        }
        request.validate()?;
        let mut proto = request.into_proto();
        proto.model = model;
        proto.cache = Some(cache.into().into_proto());
        self.generate(proto).await
    }

    /// Starts a Generate stream. No deadline: a generation takes as long as it takes, and the
    /// caller stops it by dropping the stream or cancelling the session.
    async fn generate(&self, request: v1::GenerateRequest) -> Result<GenerationStream> {
        let response = self.rpc().generate(request).await?;
        Ok(GenerationStream::new(response.into_inner()))
    }
}

/// A session being configured; `.await` it to create the session on the server.
#[must_use = "a SessionBuilder does nothing until awaited"]
#[derive(Debug)]
pub struct SessionBuilder {
    client: Client,
    model: String,
    cache: CacheConfig,
    idle_timeout: Duration,
    labels: BTreeMap<String, String>,
}

impl SessionBuilder {
    /// The initial cache strategy (default: none).
    pub fn cache(mut self, cache: impl Into<CacheConfig>) -> Self {
        self.cache = cache.into();
        self
    }

    /// Close the session after this much inactivity (rounded up to whole seconds; zero or
    /// unset: the server default; the server caps it at its maximum).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Adds a label, shown in session listings.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    fn into_proto(self) -> Result<(Client, v1::CreateSessionRequest)> {
        if self.model.is_empty() {
            return Err(Error::invalid("model name is empty"));
        }
        let seconds = self.idle_timeout.as_secs() + u64::from(self.idle_timeout.subsec_nanos() > 0);
        let request = v1::CreateSessionRequest {
            model: self.model,
            cache: Some(self.cache.into_proto()),
            idle_timeout_seconds: u32::try_from(seconds).unwrap_or(u32::MAX),
            labels: self.labels.into_iter().collect(),
        };
        Ok((self.client, request))
    }

    async fn create(self) -> Result<Session> {
        let (client, request) = self.into_proto()?;
        let info = client
            .unary(
                request,
                |mut rpc, r| async move { rpc.create_session(r).await },
            )
            .await?;
        tracing::debug!(session = %info.session_id, model = %info.model, "session created");
        Ok(client.session(info.session_id))
    }
}

impl IntoFuture for SessionBuilder {
    type Output = Result<Session>;
    type IntoFuture = BoxFuture<'static, Result<Session>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.create())
    }
}

/// A handle on a server-side session. Cheap to clone; clones may be used from other tasks while
/// a generation streams (e.g. to switch the cache mid-generation or to cancel it).
#[derive(Debug, Clone)]
pub struct Session {
    client: Client,
    id: Arc<str>,
}

impl Session {
    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The session's current state.
    pub async fn info(&self) -> Result<SessionInfo> {
        let request = v1::GetSessionRequest {
            session_id: self.id.to_string(),
        };
        let session = self
            .client
            .unary(
                request,
                |mut rpc, r| async move { rpc.get_session(r).await },
            )
            .await?;
        Ok(session.into())
    }

    /// Starts a generation in this session (one at a time per session).
    pub async fn generate(&self, request: GenerateRequest) -> Result<GenerationStream> {
        request.validate()?;
        let mut proto = request.into_proto();
        proto.session_id = self.id.to_string();
        self.client.generate(proto).await
    }

    /// Replaces the cache strategy; takes effect at the next step boundary with fresh state.
    pub async fn set_cache(&self, cache: impl Into<CacheConfig>) -> Result<SessionInfo> {
        let request = v1::SetCacheStrategyRequest {
            session_id: self.id.to_string(),
            cache: Some(cache.into().into_proto()),
        };
        let session = self
            .client
            .unary(request, |mut rpc, r| async move {
                rpc.set_cache_strategy(r).await
            })
            .await?;
        Ok(session.into())
    }

    /// Drops the cached tensors; the next step computes fully.
    pub async fn reset_cache(&self) -> Result<SessionInfo> {
        let request = v1::ResetCacheRequest {
            session_id: self.id.to_string(),
        };
        let session = self
            .client
            .unary(
                request,
                |mut rpc, r| async move { rpc.reset_cache(r).await },
            )
            .await?;
        Ok(session.into())
    }

    /// Stops the running generation at the next step boundary; `false` if none was running.
    pub async fn cancel(&self) -> Result<bool> {
        let request = v1::CancelGenerationRequest {
            session_id: self.id.to_string(),
        };
        let response = self
            .client
            .unary(request, |mut rpc, r| async move {
                rpc.cancel_generation(r).await
            })
            .await?;
        Ok(response.cancelled)
    }

    /// Closes the session (cancelling a running generation) and returns the cache bytes freed.
    pub async fn close(&self) -> Result<u64> {
        let request = v1::CloseSessionRequest {
            session_id: self.id.to_string(),
        };
        let response = self
            .client
            .unary(
                request,
                |mut rpc, r| async move { rpc.close_session(r).await },
            )
            .await?;
        tracing::debug!(session = %self.id, freed = response.freed_cache_bytes, "session closed");
        Ok(response.freed_cache_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn lazy_client() -> Client {
        Client::from_channel(Endpoint::from_static("http://127.0.0.1:1").connect_lazy())
    }

    #[tokio::test]
    async fn session_builder_defaults_and_rounding() {
        let (_, request) = lazy_client().create_session("flux").into_proto().unwrap();
        assert_eq!(request.model, "flux");
        assert_eq!(request.cache, Some(CacheConfig::None.into_proto()));
        assert_eq!(request.idle_timeout_seconds, 0);
        assert!(request.labels.is_empty());

        let (_, request) = lazy_client()
            .create_session("flux")
            .cache(CacheConfig::parse("fbc:threshold=0.1").unwrap())
            .idle_timeout(Duration::from_millis(1500))
            .label("user", "ada")
            .into_proto()
            .unwrap();
        assert_eq!(request.idle_timeout_seconds, 2);
        assert_eq!(request.labels["user"], "ada");
        assert_eq!(
            CacheConfig::from(request.cache.unwrap()).to_string(),
            "fbc:threshold=0.1"
        );
    }

    #[tokio::test]
    async fn client_side_validation() {
        let client = lazy_client();
        let err = client.create_session("").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = client
            .generate_once("", CacheConfig::None, GenerateRequest::new("x"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn connect_errors() {
        let err = Client::connect("http://[::1").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Port 1 on localhost refuses connections.
        let err = Client::connect("127.0.0.1:1").await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
    }
}
