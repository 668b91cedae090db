//! Leader election on a `coordination.k8s.io/v1` Lease. Every write carries the
//! resourceVersion it read (a real compare-and-swap): a lost race means "not
//! leader". A leader that cannot renew within `renew_deadline` (shorter than
//! the lease) steps down before any other replica may take over.

use std::time::{Duration, Instant};

use chrono::Utc;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a lease stays valid after its last renewal, as seen by others.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down (< lease_duration).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// client-go's proportions: renew deadline 2/3 of the lease, retry 1/5.
    pub fn new(namespace: String, name: String, identity: String, lease_duration: Duration) -> Self {
        Self {
            namespace,
            name,
            identity,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration / 5).max(Duration::from_millis(200)),
            lease_duration,
        }
    }
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    Leading,
    Following { holder: String },
}

/// Tracks what this replica observed of the lease (for expiry by its own clock).
pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    observed: Option<(String, Instant)>,
    last_renewal: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("leader election lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Has a lease held by someone else expired, judged by when we last saw it change (our own clock)?
pub fn lease_expired(observed_change: Instant, lease_duration: Duration, now: Instant) -> bool {
    now.duration_since(observed_change) > lease_duration
}

impl Elector {
    pub fn new(client: kube::Client, config: ElectionConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            last_renewal: None,
        }
    }

    /// True while the last renewal is recent enough to act as leader.
    pub fn may_lead(&self, now: Instant) -> bool {
        self.last_renewal
            .is_some_and(|t| now.duration_since(t) < self.config.renew_deadline)
    }

    fn error(&self, source: kube::Error) -> ElectionError {
        ElectionError::Api {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    /// One try to acquire or renew the lease.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, ElectionError> {
        let now = Instant::now();
        let me = self.config.identity.clone();
        let Some(lease) = self.api.get_opt(&self.config.name).await.map_err(|e| self.error(e))? else {
            let lease = self.lease(None, 0, true);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.last_renewal = Some(now);
                    Ok(Attempt::Leading)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following { holder: String::new() }),
                Err(e) => Err(self.error(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        // Remember when the lease last changed, by our own clock.
        match &self.observed {
            Some((seen, _)) if *seen == version => {}
            _ => self.observed = Some((version.clone(), now)),
        }
        let changed_at = self.observed.as_ref().map(|(_, t)| *t).unwrap_or(now);
        let mine = holder == me;
        let free = holder.is_empty() || lease_expired(changed_at, self.config.lease_duration, now);
        if !mine && !free {
            self.last_renewal = None;
            return Ok(Attempt::Following { holder });
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 };
        let mut next = self.lease(Some(version), transitions, !mine);
        if mine && let Some(next_spec) = next.spec.as_mut() {
            next_spec.acquire_time = spec.acquire_time.clone();
        }
        match self.api.replace(&self.config.name, &PostParams::default(), &next).await {
            Ok(written) => {
                self.observed = written.metadata.resource_version.map(|v| (v, now));
                self.last_renewal = Some(now);
                Ok(Attempt::Leading)
            }
            // Someone else wrote first: the compare-and-swap failed.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.last_renewal = None;
                Ok(Attempt::Following { holder })
            }
            Err(e) => Err(self.error(e)),
        }
    }

    /// Gives the lease up (on shutdown), so a standby takes over at once.
    pub async fn release(&mut self) {
        let Ok(Some(lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        let mut next = lease.clone();
        next.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            ..spec
        });
        let _ = self.api.replace(&self.config.name, &PostParams::default(), &next).await;
        self.last_renewal = None;
    }

    fn lease(&self, resource_version: Option<String>, transitions: i32, acquiring: bool) -> Lease {
        let now = MicroTime(
            k8s_openapi::jiff::Timestamp::from_microsecond(Utc::now().timestamp_micros()).unwrap_or_default(),
        );
        let mut lease = Lease::default();
        lease.metadata.name = Some(self.config.name.clone());
        lease.metadata.namespace = Some(self.config.namespace.clone());
        lease.metadata.resource_version = resource_version;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
            acquire_time: acquiring.then(|| now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        });
        lease
    }
}

/// Waits (as a ready standby) until this replica holds the Lease, then runs
/// `work` while renewing it. Losing the Lease, or failing to renew it within
/// the renew deadline, stops `work` at once (an error: the process exits and
/// its Deployment restarts it as a standby). `shutdown` ends the wait or the
/// work (then the Lease is given up so a standby takes over at once).
pub async fn lead_then_run(
    client: kube::Client,
    config: ElectionConfig,
    work: impl std::future::Future<Output = ()>,
    shutdown: impl std::future::Future<Output = ()>,
    on_leading: impl FnOnce(),
) -> Result<(), LeadershipLost> {
    let mut elector = Elector::new(client, config.clone());
    tokio::pin!(shutdown);
    let mut last_holder = None;
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(Attempt::Leading) => break,
            Ok(Attempt::Following { holder }) => {
                if last_holder.as_ref() != Some(&holder) {
                    tracing::info!(%holder, identity = %config.identity, "standing by: another replica leads");
                    last_holder = Some(holder);
                }
            }
            Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.retry_period) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
    tracing::info!(identity = %config.identity, lease = %config.name, "became the leader");
    on_leading();
    let keep_leading = async {
        loop {
            tokio::time::sleep(config.retry_period).await;
            if !elector.may_lead(Instant::now()) {
                return;
            }
            // Never wait on the API server past the renew deadline.
            let budget = config.renew_deadline.saturating_sub(config.retry_period);
            match tokio::time::timeout(budget, elector.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Leading)) => {}
                Ok(Ok(Attempt::Following { .. })) => return,
                Ok(Err(e)) => tracing::warn!(error = %e, "could not renew the leader lease"),
                Err(_) => tracing::warn!("renewing the leader lease timed out"),
            }
        }
    };
    let lost = tokio::select! {
        _ = work => false,
        _ = keep_leading => true,
    };
    if lost {
        return Err(LeadershipLost(config.name.clone()));
    }
    elector.release().await;
    Ok(())
}

/// The leader could not keep its Lease and stopped working.
#[derive(Debug, thiserror::Error)]
#[error("lost the leader lease {0}; stopping so that another replica leads")]
pub struct LeadershipLost(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_judged_from_the_last_observed_change() {
        let seen = Instant::now();
        let lease = Duration::from_secs(15);
        assert!(!lease_expired(seen, lease, seen + Duration::from_secs(10)));
        assert!(lease_expired(seen, lease, seen + Duration::from_secs(16)));
    }

    #[test]
    fn a_leader_steps_down_before_others_may_take_over() {
        let config = ElectionConfig::new("ns".into(), "l".into(), "me".into(), Duration::from_secs(15));
        assert!(config.renew_deadline < config.lease_duration);
        assert!(config.retry_period < config.renew_deadline);
    }
}
