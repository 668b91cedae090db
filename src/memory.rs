//! Handing freed heap back to the system. glibc keeps memory it got for a
//! burst (10,000 requests listed or created at once) in its arenas after it
//! is freed, so the operator's RSS stays at the burst's peak. Asking it now
//! and then to return whole free pages (`malloc_trim`) brings RSS back to
//! what is in use; the call takes a few milliseconds on a large heap and runs
//! on a blocking thread.

use std::time::Duration;

/// How often freed memory is handed back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Hands freed heap back to the system every `period`, forever.
pub async fn give_back_freed(period: Duration) {
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
