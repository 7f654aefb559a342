//! Seeded draws from libtorch's global CPU generator, as diffusers draws from a seeded
//! `torch.Generator("cpu")`. tch exposes neither per-generator state nor a way to save and restore
//! it, so a sequence of draws runs under one lock, right after seeding, with no other thread
//! drawing in between.
use std::sync::Mutex;

static CPU_RNG: Mutex<()> = Mutex::new(());

/// Seeds the global CPU generator with `seed` and runs `draws` before any other thread may draw.
pub fn with_seeded_cpu_rng<T>(seed: u64, draws: impl FnOnce() -> T) -> T {
    let _rng = CPU_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed as i64);
    draws()
}
