//! Measures what the server adds around the model: time to the first events of a stream and the
//! per-step streaming overhead (client-side step interval minus the server's own step time).
//!
//! `cargo run --release -p denoised-tests --example stream_overhead -- [steps] [runs]`
//! (needs `make parity-data` for the tiny model).
use std::time::{Duration, Instant};

use denoised_client::{CacheConfig, Client, Event, GenerateRequest};
use denoised_tests::{TestServer, MODEL};
use futures::StreamExt;

#[tokio::main]
async fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u32>().expect("numeric argument"));
    let steps = args.next().unwrap_or(50);
    let runs = args.next().unwrap_or(5);
    let server = TestServer::start().await;
    let client = Client::connect(server.url.clone()).await.unwrap();
    let session = client
        .create_session(MODEL)
        .cache(CacheConfig::None)
        .await
        .unwrap();

    let (mut to_started, mut to_first_step, mut overheads): (
        Vec<Duration>,
        Vec<Duration>,
        Vec<Duration>,
    ) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=runs {
        let sent = Instant::now();
        let request = GenerateRequest::new("a red circle at the top left")
            .size(32, 32)
            .steps(steps)
            .seed(1);
        let mut stream = session.generate(request).await.unwrap();
        let mut last: Option<Instant> = None;
        while let Some(event) = stream.next().await {
            let now = Instant::now();
            match event.unwrap() {
                Event::Started(_) => to_started.push(now - sent),
                Event::Step(step) => {
                    match last {
                        None => to_first_step.push(now - sent),
                        Some(prev) => overheads.push((now - prev).saturating_sub(step.step_time)),
                    }
                    last = Some(now);
                }
                Event::Completed(_) => {}
            }
        }
        if run == 0 {
            // Warm-up run (allocator, first kernels): not counted.
            to_started.clear();
            to_first_step.clear();
            overheads.clear();
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!("tiny FLUX model, 32x32, {steps} steps, {runs} runs, CPU");
    println!(
        "time to Started event     (median): {:?}",
        median(&mut to_started)
    );
    println!(
        "time to first Step event  (median): {:?}",
        median(&mut to_first_step)
    );
    println!(
        "per-step streaming overhead (median): {:?}",
        median(&mut overheads)
    );
    server.stop().await;
}
