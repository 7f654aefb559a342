//! What a client in any language relies on before it has the .proto: health and reflection; and
//! what an operator relies on at start-up: a broken model folder is refused or skipped.
use denoised_server::config::ModelEntry;
use denoised_server::server;
use denoised_tests::{tiny_model_dir, TestServer};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let server = TestServer::start().await;
    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "denoised.v1.Denoiser".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"denoised.v1.Denoiser".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_model_is_refused_or_skipped() {
    // A copy of the tiny model without its VAE weights.
    let broken = std::env::temp_dir().join(format!("denoised-broken-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&broken);
    copy_dir(&tiny_model_dir(), &broken);
    std::fs::remove_file(broken.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let entry = ModelEntry {
        name: "broken".into(),
        path: broken.clone(),
        max_sequence_length: None,
        vae_tiling: false,
        admission_budget: None,
    };

    let mut config = denoised_server::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        models: vec![entry],
        device: "cpu".into(),
        ..Default::default()
    };
    let err = match server::start(config.clone()).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a model without VAE weights must not load"),
    };
    assert!(err.contains("broken") && err.contains("vae"), "{err}");

    config.skip_bad_models = true;
    let running = server::start(config)
        .await
        .expect("starts without the broken model");
    let client = denoised_client::Client::connect(format!("http://{}", running.addr))
        .await
        .unwrap();
    assert!(client.list_models().await.unwrap().is_empty());
    running.shutdown().await.unwrap();
    std::fs::remove_dir_all(&broken).unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
