//! Which replica steps rollouts: the holder of a lease in the store (table `leases`). Every
//! replica ingests (the broker's shared subscription splits the messages); only the holder
//! steps rollouts, follows the fleet repository, starts rollouts through the API and publishes
//! gates; the others read the rollouts back at each renewal, for their pages and API. The
//! holder renews every [`RENEW_EVERY`]; a lease not renewed for [`TTL_SECS`] is
//! taken by the next replica to ask, which first reads every rollout back from the store (the
//! holder saved each change before publishing its gate).
//!
//! A holder trusts its lease for [`TRUSTED`] after the write that renewed it began, well before
//! it runs out for the others: a holder that cannot reach the database stops stepping before
//! another replica can take over. Replicas' clocks must agree within a few seconds (NTP).
//! A clean stop gives the lease up at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::gates::Driver;
use crate::store::{Store, StoreError};

pub const NAME: &str = "rollouts";
pub const TTL_SECS: u64 = 15;
pub const RENEW_EVERY: Duration = Duration::from_secs(3);
pub const TRUSTED: Duration = Duration::from_secs(10);

/// One renewal (blocking: the store). Returns who holds the lease now.
pub fn renew(
    holder: &str,
    store: &Mutex<Store>,
    driver: &Mutex<Driver>,
) -> Result<String, StoreError> {
    let began = Instant::now();
    let now = crate::unix_now();
    // The store before the driver, as ingest takes them.
    let mut db = store.lock().unwrap_or_else(|e| e.into_inner());
    let held_by = db.lease(NAME, holder, now, now.saturating_add(TTL_SECS))?;
    let mut d = driver.lock().unwrap_or_else(|e| e.into_inner());
    if held_by == holder {
        if !d.leading() {
            // Taken (or taken back): carry on from what the store holds.
            d.reload(db.rollouts()?);
            tracing::info!(replica = %holder, "this replica leads rollouts");
        }
        d.lead_until(Some(began + TRUSTED), holder);
    } else {
        if d.leading() || d.leader() != Some(held_by.as_str()) {
            tracing::info!(leader = %held_by, "another replica leads rollouts; this one ingests only");
        }
        d.lead_until(None, &held_by);
        // What the leader saved, for this replica's page and API (never stepped here).
        d.reload(db.rollouts()?);
    }
    Ok(held_by)
}

/// One renewal off the async workers; a failure is logged (the lease then runs out by itself,
/// [`TRUSTED`] after the last renewal, and stepping stops).
pub async fn renew_now(holder: &str, store: &Arc<Mutex<Store>>, driver: &Arc<Mutex<Driver>>) {
    let (h, s, d) = (holder.to_string(), store.clone(), driver.clone());
    match tokio::task::spawn_blocking(move || renew(&h, &s, &d)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("cannot renew the rollout lease: {e}"),
        Err(e) => tracing::error!("renewing the rollout lease failed: {e}"),
    }
}

/// Renews the lease every [`RENEW_EVERY`] until `shutdown`, then gives it up.
pub async fn run(
    holder: String,
    store: Arc<Mutex<Store>>,
    driver: Arc<Mutex<Driver>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        renew_now(&holder, &store, &driver).await;
    }
    let released = tokio::task::spawn_blocking(move || {
        driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lead_until(None, "");
        store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(NAME, &holder)
    })
    .await;
    if let Ok(Err(e)) = released {
        tracing::warn!("cannot give the rollout lease up (it runs out in {TTL_SECS} s): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Budget, OnFailure, Policy, StageSpec};
    use crate::store::Sqlite;

    fn driver() -> Driver {
        let key = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
        let policy = crate::policy::Named {
            name: "default".into(),
            apps: None,
            policy: Policy {
                stages: vec![StageSpec {
                    name: "all".into(),
                    selector: Default::default(),
                    share: Some(100),
                    bake_secs: 0,
                }],
                budget: Budget::Nodes(0),
                on_failure: OnFailure::Halt,
            },
        };
        Driver::new(vec![policy], key, "edgesync/gates").with_lease()
    }

    #[test]
    fn one_replica_steps_rollouts_and_the_next_carries_on_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Mutex::new(
            Store::new(Box::new(Sqlite::open(&dir.path().join("hub.db")).unwrap())).unwrap(),
        );
        let (a, b) = (Mutex::new(driver()), Mutex::new(driver()));
        assert!(!a.lock().unwrap().leading(), "no lease yet");
        assert_eq!(renew("a", &store, &a).unwrap(), "a");
        assert_eq!(renew("b", &store, &b).unwrap(), "a");
        assert!(a.lock().unwrap().leading());
        assert!(!b.lock().unwrap().leading());
        assert_eq!(b.lock().unwrap().leader(), Some("a"));
        // a starts a rollout and saves it, as the hub does before publishing the gate.
        {
            let mut d = a.lock().unwrap();
            d.start("web", "new", Some("old"), 100).unwrap();
            let (rollout, issued) = d.saved("web").unwrap();
            store
                .lock()
                .unwrap()
                .save_rollout(&rollout, issued)
                .unwrap();
        }
        // a stops cleanly: b takes over at its next renewal with a's rollout and `issued`.
        store.lock().unwrap().release(NAME, "a").unwrap();
        assert_eq!(renew("b", &store, &b).unwrap(), "b");
        let d = b.lock().unwrap();
        assert!(d.leading());
        assert_eq!(d.saved("web"), a.lock().unwrap().saved("web"));
        drop(d);
        // a comes back: b holds the lease, a stops stepping and shows what b saved.
        {
            let mut d = b.lock().unwrap();
            let mut rollout = d.saved("web").unwrap().0;
            rollout.opened = 2;
            d.restore("web", 101, Some(rollout.clone()));
            store.lock().unwrap().save_rollout(&rollout, 101).unwrap();
        }
        assert_eq!(renew("a", &store, &a).unwrap(), "b");
        assert!(!a.lock().unwrap().leading());
        assert_eq!(a.lock().unwrap().saved("web").unwrap().0.opened, 2);
    }

    #[test]
    fn without_a_lease_a_driver_always_leads() {
        let key = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
        let d = Driver::new(Vec::new(), key, "edgesync/gates");
        assert!(d.leading());
        assert_eq!(d.leader(), None);
    }
}
