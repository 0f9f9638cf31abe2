//! Keeps a workload certificate fresh in the background.
//!
//! The manager owns one task. It publishes each new certificate on a watch
//! channel; handshakes read the latest value and never wait for the CA. On a
//! failure the current certificate stays in use and the task retries with
//! exponential backoff and jitter.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::cert::{CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, merge_roots, pem_certs};
use crate::{CaClient, Error, KeyAlgorithm, SpiffeId, WorkloadCert, keys};

/// Where certificates come from.
#[derive(Debug)]
pub enum Source {
    /// Signed by the Istio CA (istiod or the embedded CA).
    Ca {
        /// The CA client.
        client: CaClient,
        /// The identity to request.
        id: SpiffeId,
        /// The key algorithm.
        key: KeyAlgorithm,
        /// Requested lifetime (Istio's default: 24 h).
        ttl: Duration,
        /// A root-certificate file merged into the trust roots: read at every
        /// renewal and re-read whenever it changes between renewals
        /// (checked every [`RenewalPolicy::root_poll`]), so a rotated root
        /// is trusted at once.
        root_file: Option<PathBuf>,
    },
    /// Mounted files in Istio's layout, reloaded when they change.
    Files {
        /// The directory holding `cert-chain.pem`, `key.pem`, `root-cert.pem`.
        dir: PathBuf,
        /// How often to look for changes.
        poll: Duration,
    },
}

/// The longest the manager ever sleeps at once (a year): delays computed
/// from hostile settings or far-off dates are cut to it, so time arithmetic
/// never overflows.
const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// When to renew and how to back off.
#[derive(Clone, Debug)]
pub struct RenewalPolicy {
    /// Renew after this fraction of the certificate's lifetime, measured
    /// from when it was received (default 0.5, istio-agent's
    /// `SECRET_GRACE_PERIOD_RATIO`).
    pub renew_fraction: f64,
    /// Random spread of the renewal time, as a fraction of the grace period
    /// (default 0.01 = ±1 %, istio-agent's default).
    pub renew_jitter: f64,
    /// Never renew sooner than this after a certificate arrived (default
    /// 1 s), whatever its lifetime: no back-to-back renewals.
    pub min_renew_delay: Duration,
    /// How often the root file of a CA source is checked for a rotated root
    /// (default 5 s).
    pub root_poll: Duration,
    /// First retry delay after a failure (default 500 ms).
    pub backoff_initial: Duration,
    /// Longest retry delay (default 150 s).
    pub backoff_max: Duration,
    /// Random spread of each retry delay, as a fraction (default 0.2 = ±20 %).
    pub jitter: f64,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self {
            renew_fraction: 0.5,
            renew_jitter: 0.01,
            min_renew_delay: Duration::from_secs(1),
            root_poll: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(150),
            jitter: 0.2,
        }
    }
}

impl RenewalPolicy {
    fn jittered(&self, d: Duration) -> Duration {
        // NaN or out-of-range settings mean no jitter, never a panic.
        let j = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let factor = 1.0 + rand::random_range(-j..=j);
        Duration::try_from_secs_f64(d.as_secs_f64() * factor.max(0.0)).unwrap_or(MAX_DELAY)
    }
}

/// Counters a caller can watch (tests, metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretStats {
    /// Certificates obtained (first one included).
    pub issued: u64,
    /// Failed attempts.
    pub failures: u64,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Times a rotated root file was picked up between renewals.
    pub root_reloads: u64,
}

/// The running manager. Dropping it stops the background task.
#[derive(Debug)]
pub struct SecretManager {
    cert: watch::Receiver<Option<Arc<WorkloadCert>>>,
    stats: watch::Receiver<SecretStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SecretManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Worker {
    source: Source,
    policy: RenewalPolicy,
    cert: watch::Sender<Option<Arc<WorkloadCert>>>,
    stats: watch::Sender<SecretStats>,
}

impl SecretManager {
    /// Starts the background task (needs a tokio runtime).
    pub fn start(source: Source, policy: RenewalPolicy) -> Self {
        let (cert_tx, cert_rx) = watch::channel(None);
        let (stats_tx, stats_rx) = watch::channel(SecretStats::default());
        let worker = Worker {
            source,
            policy,
            cert: cert_tx,
            stats: stats_tx,
        };
        let task = tokio::spawn(worker.run());
        Self {
            cert: cert_rx,
            stats: stats_rx,
            task,
        }
    }

    /// The current certificate, if one has been obtained.
    pub fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.cert.borrow().clone()
    }

    /// A watch that sees every new certificate.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<WorkloadCert>>> {
        self.cert.clone()
    }

    /// Counters of the background task.
    pub fn stats(&self) -> SecretStats {
        self.stats.borrow().clone()
    }

    /// Waits for the first certificate.
    pub async fn ready(&self, timeout: Duration) -> Result<Arc<WorkloadCert>, Error> {
        let mut rx = self.cert.clone();
        let wait = rx.wait_for(|c| c.is_some());
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(c)) => c
                .clone()
                .ok_or_else(|| Error::Config("no certificate".into())),
            Ok(Err(_)) => Err(Error::Config("the secret manager stopped".into())),
            Err(_) => Err(Error::Ca {
                code: "Timeout".into(),
                message: format!(
                    "no certificate after {timeout:?}; last error: {}",
                    self.stats().last_error.unwrap_or_else(|| "none".into())
                ),
            }),
        }
    }
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Worker {
    async fn run(self) {
        match &self.source {
            Source::Ca { .. } => self.run_ca().await,
            Source::Files { .. } => self.run_files().await,
        }
    }

    fn failed(&self, e: &Error) {
        tracing::warn!("certificate renewal failed: {e}");
        self.stats.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(e.to_string());
        });
    }

    fn publish(&self, cert: WorkloadCert) {
        tracing::info!(id = ?cert.id(), not_after = ?cert.not_after(), "new workload certificate");
        self.stats.send_modify(|s| {
            s.issued += 1;
            s.last_error = None;
        });
        self.cert.send_replace(Some(Arc::new(cert)));
    }

    /// The roots of the CA source's root file, if it has one.
    async fn root_file_certs(
        &self,
    ) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, Error> {
        let Source::Ca {
            root_file: Some(path),
            ..
        } = &self.source
        else {
            return Ok(Vec::new());
        };
        let pem = tokio::fs::read(path)
            .await
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        pem_certs(&pem)
    }

    async fn fetch(&self) -> Result<WorkloadCert, Error> {
        let Source::Ca {
            client,
            id,
            key,
            ttl,
            ..
        } = &self.source
        else {
            return Err(Error::Config("not a CA source".into()));
        };
        let key = keys::generate_key(*key)?;
        let csr = keys::csr_for(id, &key)?;
        let chain = client.sign(&csr, *ttl).await?;
        let mut roots = self.root_file_certs().await?;
        // The last element of a CA response is its root.
        merge_roots(&mut roots, chain.last().cloned());
        let cert = WorkloadCert::new(chain, keys::private_key_der(&key), roots)?;
        if cert.id() != Some(id) {
            return Err(Error::Certificate(format!(
                "the CA issued {:?}, not the requested {id}",
                cert.id().map(ToString::to_string)
            )));
        }
        Ok(cert)
    }

    /// Re-reads the root file; when its roots changed, publishes the current
    /// certificate with them (handshakes verify peers against the new root
    /// at once, not at the next renewal).
    async fn reload_roots(&self) {
        let Some(current) = self.cert.borrow().clone() else {
            return;
        };
        let mut roots = match self.root_file_certs().await {
            Ok(r) => r,
            // Half-written or missing: keep the current roots, look again.
            Err(e) => {
                tracing::debug!("root file not reloaded: {e}");
                return;
            }
        };
        merge_roots(&mut roots, current.chain().last().cloned());
        if roots.as_slice() == current.roots() {
            return;
        }
        tracing::info!(
            roots = roots.len(),
            "trust roots reloaded from the root file"
        );
        // Counters first: whoever sees the new value sees it counted.
        self.stats.send_modify(|s| s.root_reloads += 1);
        self.cert
            .send_replace(Some(Arc::new(current.with_roots(roots))));
    }

    fn root_file_mtime(&self) -> Option<SystemTime> {
        match &self.source {
            Source::Ca {
                root_file: Some(p), ..
            } => mtime(p),
            _ => None,
        }
    }

    async fn run_ca(self) {
        let mut backoff = self.policy.backoff_initial.min(MAX_DELAY);
        let mut root_seen = self.root_file_mtime();
        loop {
            let delay = match self.fetch().await {
                Ok(cert) => {
                    backoff = self.policy.backoff_initial;
                    let at = cert.renew_at(
                        self.policy.renew_fraction,
                        self.policy.renew_jitter,
                        rand::random_range(-1.0..=1.0),
                        self.policy.min_renew_delay,
                    );
                    self.publish(cert);
                    at.duration_since(SystemTime::now()).unwrap_or_default()
                }
                Err(e) => {
                    self.failed(&e);
                    let d = self.policy.jittered(backoff);
                    backoff = backoff.saturating_mul(2).min(self.policy.backoff_max);
                    d
                }
            };
            // Sleep until the renewal, watching the root file meanwhile.
            let wake = tokio::time::Instant::now() + delay.min(MAX_DELAY);
            let poll = self.policy.root_poll.max(Duration::from_millis(10));
            loop {
                let now = tokio::time::Instant::now();
                if now >= wake {
                    break;
                }
                if !matches!(
                    self.source,
                    Source::Ca {
                        root_file: Some(_),
                        ..
                    }
                ) {
                    tokio::time::sleep_until(wake).await;
                    break;
                }
                tokio::time::sleep((wake - now).min(poll)).await;
                let seen = self.root_file_mtime();
                if seen != root_seen {
                    root_seen = seen;
                    self.reload_roots().await;
                }
            }
        }
    }

    async fn run_files(self) {
        let Source::Files { dir, poll } = &self.source else {
            return;
        };
        let files = [CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE].map(|f| dir.join(f));
        let mut seen: Option<[Option<SystemTime>; 3]> = None;
        loop {
            let now = files.clone().map(|f| mtime(&f));
            if seen != Some(now) {
                let dir = dir.clone();
                match tokio::task::spawn_blocking(move || WorkloadCert::from_dir(&dir)).await {
                    Ok(Ok(cert)) => {
                        self.publish(cert);
                        seen = Some(now);
                    }
                    // A half-written set of files fails to parse: keep the
                    // old certificate and look again at the next poll.
                    Ok(Err(e)) => self.failed(&e),
                    Err(e) => self.failed(&Error::Io(e.to_string())),
                }
            }
            tokio::time::sleep(*poll).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_retry_settings_do_not_panic() {
        for (jitter, d) in [
            (f64::NAN, Duration::MAX),
            (f64::INFINITY, Duration::from_secs(1)),
            (-3.0, Duration::MAX),
            (0.2, Duration::MAX),
        ] {
            let p = RenewalPolicy {
                jitter,
                ..RenewalPolicy::default()
            };
            assert!(p.jittered(d) <= MAX_DELAY.max(d));
        }
        assert_eq!(Duration::MAX.saturating_mul(2), Duration::MAX);
    }
}
