//! The fault-injection suite at full size: 100 SIGKILLs of the agent at random points while an
//! app of 50 objects syncs commits that add, change and remove objects (prune on), then 5
//! outages each of the API server (mid-sync), the Git server and the MQTT broker, on the real control plane.
//! Prints the loss counts (all must be 0), the recovery times and whether an outage spent retry
//! budget, for docs/RELIABILITY.md. `cargo bench --bench chaos` (`EDGESYNC_CHAOS_KILLS` to change the count).

#[allow(dead_code, unused_imports)]
#[path = "../tests/it/harness/mod.rs"]
mod harness;

#[path = "../tests/it/chaos.rs"]
mod chaos;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() {
    // Under `cargo test --benches` it does nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let kills = std::env::var("EDGESYNC_CHAOS_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(100);
    let report = chaos::run(kills, 7).await;
    let worst = report.recoveries.iter().copied().fold(0.0, f64::max);
    println!(
        "chaos: {} kills of the agent (50 objects, prune on), {} of them before the sync recorded its revision",
        report.kills, report.mid_sync
    );
    println!(
        "  lost {}  wrongly pruned {}  left over {}  stale {}  duplicated {}",
        report.lost, report.wrongly_pruned, report.left_over, report.stale, report.duplicated
    );
    println!(
        "  restart after a mid-sync kill to target revision applied: median {:.2} s, worst {:.2} s",
        median(report.recoveries.clone()),
        worst
    );
    let outages = chaos::outages(5, std::time::Duration::from_secs(15), 3).await;
    println!(
        "outages: 5 each of the API server mid-sync, the Git server and the MQTT broker, 15 s each; backoff ceiling {} s, poll 1 s",
        chaos::OUTAGE_CEILING.as_secs()
    );
    for (what, times) in [
        ("API server back to revision applied", &outages.api_server),
        ("Git server back to revision applied", &outages.git_server),
        (
            "MQTT broker back to the retained document at the new revision",
            &outages.broker,
        ),
    ] {
        println!(
            "  {what}: median {:.2} s, worst {:.2} s",
            median(times.clone()),
            times.iter().copied().fold(0.0, f64::max)
        );
    }
    println!("  retry budget spent while away: {}", outages.budget_spent);
    let losses =
        report.lost + report.wrongly_pruned + report.left_over + report.stale + report.duplicated;
    if outages.budget_spent {
        std::process::exit(1);
    }
    if losses > 0 {
        std::process::exit(1);
    }
}
