//! One active operator replica: leader election on a
//! `coordination.k8s.io/v1` Lease, as client-go's leader election does it.
//!
//! - A replica takes the Lease when nobody holds it, or when the holder's
//!   record (holder, renew time, resourceVersion) has not changed for the
//!   Lease's duration **by the candidate's own clock**, counted from when
//!   the candidate first saw that record: a holder whose clock runs
//!   behind or ahead cannot make a live Lease look expired, or a dead one
//!   look alive.
//! - The leader renews every `duration / 3`, each renewal under a deadline
//!   that ends before a rival could take over; a leader that could not
//!   renew within two thirds of the duration stops leading first.
//! - Every write carries the resourceVersion it read, so two replicas
//!   racing for it cannot both win.
//! - A leader that stops (SIGTERM) releases the Lease, so that a candidate
//!   takes over at once rather than after the duration.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, PostParams};

/// A candidate for the Lease `name`.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The holder's record as last seen, and when this candidate first
    /// saw it (by its own clock).
    seen: Mutex<Option<(String, Timestamp)>>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// What changes whenever the holder renews.
fn record(lease: &Lease, spec: &LeaseSpec) -> String {
    format!(
        "{}|{:?}|{}",
        spec.holder_identity.as_deref().unwrap_or(""),
        spec.renew_time.as_ref().map(|t| t.0),
        lease.resource_version().unwrap_or_default()
    )
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            seen: Mutex::new(None),
        }
    }

    /// Whether the holder's `record` has stood unchanged for `held_for`
    /// seconds since this candidate first saw it at or before `now`.
    fn stale(&self, record: String, held_for: i64, now: Timestamp) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.as_ref() {
            Some((r, since)) if *r == record => *since + SignedDuration::from_secs(held_for) < now,
            _ => {
                *seen = Some((record, now));
                false
            }
        }
    }

    /// Takes or renews the Lease; true while this replica holds it. `now`
    /// is this candidate's clock.
    pub async fn try_lead(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let seconds = self.duration.as_secs().max(1) as i32;
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let free = spec.holder_identity.as_deref().unwrap_or("").is_empty();
        let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(seconds).max(1));
        let expired = !mine && !free && self.stale(record(&current, &spec), held_for, now);
        if !(mine || free || expired) {
            return Ok(false);
        }
        let mut lease = current;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
            ..spec
        });
        // replace() sends the resourceVersion read above: a racing writer
        // gets 409 Conflict.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Hands the Lease back if this replica holds it: no holder, so a
    /// candidate takes it at its next try. Best effort, under a deadline.
    pub async fn release(&self) {
        // A renewal still on its way may land between the read and the
        // write (409): once more then.
        let twice = async {
            match self.release_once().await {
                Err(kube::Error::Api(e)) if e.code == 409 => self.release_once().await,
                other => other,
            }
        };
        match tokio::time::timeout(self.duration / 3, twice).await {
            Ok(Ok(true)) => tracing::info!("leader election: Lease released"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election: Lease not released"),
            Err(_) => tracing::warn!("leader election: Lease not released in time"),
        }
    }

    /// One try of [`release`](Self::release): whether it was handed back.
    async fn release_once(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(true)
    }

    /// Waits until this replica leads; when the winning request was sent
    /// (the Lease is good for a duration from no later than that).
    pub async fn acquire(&self) -> tokio::time::Instant {
        loop {
            let sent = tokio::time::Instant::now();
            let tried = tokio::time::timeout(self.duration / 3, self.try_lead(Timestamp::now()));
            match tried.await {
                Ok(Ok(true)) => return sent,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "leader election: the Lease is unreachable")
                }
                Err(_) => tracing::warn!("leader election: the Lease did not answer in time"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the Lease, taken or last renewed by a request sent at
    /// `since`, until it is lost; returns when this replica must stop
    /// leading. A renewal that fails is tried again every tenth of the
    /// duration (at most 2 s) until two thirds of the duration after the
    /// last good one was sent: past that, a rival may soon take the
    /// Lease, and this replica stops first.
    pub async fn keep(&self, since: tokio::time::Instant) {
        let give_up = self.duration * 2 / 3;
        let mut last = since;
        let mut wait = self.duration / 3;
        loop {
            tokio::time::sleep(wait).await;
            let left = give_up.saturating_sub(last.elapsed());
            if left.is_zero() {
                tracing::error!("leader election: not renewed in time; stepping down");
                return;
            }
            let sent = tokio::time::Instant::now();
            match tokio::time::timeout(left, self.try_lead(Timestamp::now())).await {
                Ok(Ok(true)) => {
                    last = sent;
                    wait = self.duration / 3;
                }
                Ok(Ok(false)) => {
                    tracing::error!("leader election: another replica holds the Lease");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "leader election: renewal failed; trying again");
                    wait = self.retry();
                }
                Err(_) => {
                    tracing::warn!("leader election: renewal did not answer in time");
                    wait = self.retry();
                }
            }
        }
    }

    /// Between tries of a renewal that failed.
    fn retry(&self) -> Duration {
        (self.duration / 10).min(Duration::from_secs(2))
    }
}
