//! Two operator replicas with leader election, against the real API server:
//! SIGKILL the leader while locks are being granted; the standby takes over
//! within the lease duration, nothing is granted twice and nothing is lost.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Operator, lock_request, phase_of};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, PostParams};
use kube_lock_manager::crd::{DistributedLock, Phase};
use serde_json::json;

const LEASE: Duration = Duration::from_secs(3);

async fn lease_holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_is_killed() {
    if common::services().is_none() {
        return;
    }
    let client = kube::Client::try_default().await.unwrap();
    common::install_crd(&client).await;
    let ns = common::namespace(&client, "ha").await;
    let run = common::unique("ha");
    let lease_name = common::unique("leader");
    let args = |identity: &'static str| {
        [
            common::leader_election_args(&ns, &lease_name),
            vec!["--identity".to_string(), identity.to_string()],
        ]
        .concat()
    };
    let a_args = args("replica-a");
    let b_args = args("replica-b");
    let mut a = Operator::start(&run, &a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut b = Operator::start(&run, &b_args.iter().map(String::as_str).collect::<Vec<_>>());
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let first_leader = common::eventually("a leader", Duration::from_secs(20), || async {
        lease_holder(&leases, &lease_name).await.filter(|h| !h.is_empty())
    })
    .await;

    let requests: Api<DistributedLock> = Api::namespaced(client.clone(), &ns);
    let total = 10;
    for i in 0..total {
        requests
            .create(
                &PostParams::default(),
                &lock_request(&run, &format!("r{i:02}"), json!({"lockId": "ha"})),
            )
            .await
            .unwrap();
    }
    // The workload: take each grant, check it is the only one, release it.
    let mut grants: Vec<(String, String, i64)> = Vec::new();
    let mut killed_at = None;
    let mut takeover = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while grants.len() < total {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} requests were granted: {grants:?}",
            grants.len()
        );
        let all = requests.list(&Default::default()).await.unwrap().items;
        let granted: Vec<_> = all
            .iter()
            .filter(|l| phase_of(l) == Some(Phase::Granted) && l.metadata.deletion_timestamp.is_none())
            .collect();
        assert!(granted.len() <= 1, "two holders at once: {granted:?}");
        let Some(holder) = granted.first() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let name = holder.metadata.name.clone().unwrap();
        let status = holder.status.clone().unwrap();
        grants.push((name.clone(), status.token.unwrap(), status.fencing_token.unwrap()));
        if killed_at.is_some() && takeover.is_none() {
            takeover = killed_at.map(|k: Instant| k.elapsed());
        }
        if grants.len() == 3 {
            // SIGKILL the leader while requests are waiting to be granted.
            if first_leader == "replica-a" {
                a.kill()
            } else {
                b.kill()
            }
            killed_at = Some(Instant::now());
        }
        requests.delete(&name, &DeleteParams::default()).await.unwrap();
        common::eventually("the released request to go", Duration::from_secs(30), || async {
            requests.get_opt(&name).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    let takeover = takeover.expect("a grant after the kill");
    assert!(
        takeover < LEASE + Duration::from_secs(4),
        "the standby took {takeover:?} to grant after the leader died"
    );
    let new_leader = lease_holder(&leases, &lease_name).await.unwrap();
    assert_ne!(new_leader, first_leader, "the standby leads now");
    let names: HashSet<_> = grants.iter().map(|g| &g.0).collect();
    assert_eq!(names.len(), total, "every request granted exactly once: {grants:?}");
    let tokens: HashSet<_> = grants.iter().map(|g| &g.1).collect();
    assert_eq!(tokens.len(), total, "a fresh token per grant");
    assert!(
        grants.windows(2).all(|w| w[0].2 < w[1].2),
        "fencing tokens grow: {grants:?}"
    );
}
