//! Feeding the [`Window`]: every interval, each registered proxy's `/metrics` is fetched (all
//! at once, each with a timeout), read with `mesh_core::exposition` and recorded; a proxy that
//! does not answer is marked down, and proxies that left the registry are forgotten.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::window::{Target, Window};

/// How often proxies are scraped by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The window, shared between the scraper and whoever answers questions from it.
pub type SharedWindow = Arc<Mutex<Window>>;

/// Scrapes the proxies `targets` lists into `window` every `interval`, forever.
pub async fn run(window: SharedWindow, targets: impl Fn() -> Vec<Target>, interval: Duration) {
    let client = client();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        scrape_once(&window, &client, &targets()).await;
    }
}

/// The HTTP client scrapes go through.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(SCRAPE_TIMEOUT)
        .no_proxy()
        .build()
        .unwrap_or_default()
}

/// A client for long streams from proxies (tap): no overall timeout.
pub fn client_without_timeout() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(SCRAPE_TIMEOUT)
        .no_proxy()
        .build()
        .unwrap_or_default()
}

/// One round: scrapes every target in `targets` and records what each answered.
pub async fn scrape_once(window: &SharedWindow, client: &reqwest::Client, targets: &[Target]) {
    let fetches = targets.iter().map(|t| async move {
        let text = async {
            let rsp = client
                .get(format!("http://{}/metrics", t.admin))
                .send()
                .await?
                .error_for_status()?;
            rsp.text().await
        }
        .await;
        (t, Instant::now(), text)
    });
    let answers = futures_util::future::join_all(fetches).await;
    let live: BTreeSet<String> = targets.iter().map(|t| t.admin.clone()).collect();
    let mut window = window.lock().unwrap_or_else(PoisonError::into_inner);
    for (target, at, text) in answers {
        match text.map(|t| mesh_core::exposition::parse(&t)) {
            Ok(Ok(samples)) => window.record(target, at, &samples),
            Ok(Err(error)) => {
                tracing::debug!(admin = %target.admin, %error, "unreadable metrics");
                window.record_down(target, at);
            }
            Err(error) => {
                tracing::debug!(admin = %target.admin, %error, "scrape failed");
                window.record_down(target, at);
            }
        }
    }
    window.prune(&live, Instant::now());
}

/// The window as a [`crate::MetricsView`]: the embedded mesh's answers, at the time asked.
#[derive(Clone, Debug)]
pub struct Embedded(pub SharedWindow);

impl Embedded {
    fn read<T>(&self, f: impl FnOnce(&Window, Instant) -> T) -> T {
        let window = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&window, Instant::now())
    }
}

impl crate::MetricsView for Embedded {
    async fn stat(
        &self,
        resource: crate::Resource,
        query: &crate::Query,
    ) -> Result<Vec<crate::StatRow>, crate::ViewError> {
        Ok(self.read(|w, now| w.stat(resource, query, now)))
    }

    async fn routes(&self, query: &crate::Query) -> Result<Vec<crate::RouteRow>, crate::ViewError> {
        Ok(self.read(|w, now| w.routes(query, now)))
    }

    async fn edges(&self, query: &crate::Query) -> Result<Vec<crate::EdgeRow>, crate::ViewError> {
        Ok(self.read(|w, now| w.edges(query, now)))
    }
}
