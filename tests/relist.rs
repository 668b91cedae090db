//! A request that leaves this operator's view while its watch is down is
//! never delivered as deleted: the watch, resumed too late (410 Gone),
//! lists the requests again, and the one missing from that list must still
//! be let go — its lock released, phase Released, its finalizer removed —
//! not left Granted with a lease nobody renews and a finalizer nobody runs.
//!
//! Restarts the shared API server: alone in its test binary.

mod common;

use common::chaos::testenv;
use common::{Setup, WAIT, await_lock, phase_of};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use kube_lock_manager::crd::Phase;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

/// Resumes the operator also when the test fails while it is stopped.
struct ContinueOnDrop(Pid);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

#[tokio::test]
async fn a_request_that_left_the_selector_while_the_watch_was_down_is_let_go() {
    let Some(t) = Setup::new("relist", &[]).await else {
        return;
    };
    t.create("holder", json!({"lockId": "r", "ttl": "30s"})).await;
    t.granted("holder").await;
    t.create("waiter", json!({"lockId": "r"})).await;
    t.pending_at("waiter", 1).await;
    // the operator stops; the API server restarts, so its watch cache
    // starts anew and the operator's watch, from before, is too old for it
    let operator = Pid::from_raw(t.operator.child.id() as i32);
    kill(operator, Signal::SIGSTOP).unwrap();
    let _resume = ContinueOnDrop(operator);
    testenv(&["kill", "apiserver"]);
    testenv(&["up"]);
    // meanwhile someone removes the label the operator selects by
    let patch = Patch::Merge(json!({"metadata": {"labels": {common::RUN_LABEL: null}}}));
    common::eventually("the label removed", WAIT, || async {
        t.api
            .patch("holder", &PatchParams::default(), &patch)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    kill(operator, Signal::SIGCONT).unwrap();
    let left = await_lock(&t.api, "holder", "Released without our finalizer", WAIT, |l| {
        phase_of(l) == Some(Phase::Released) && !l.finalizers().iter().any(|f| f == "lockmanager.dev/release")
    })
    .await;
    assert_eq!(common::condition(&left, "Granted").unwrap().reason, "NotSelected");
    t.granted("waiter").await;
}
