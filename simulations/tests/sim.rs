//! A few small seeded runs of `meshsync-sim` (three real devices, a short schedule of
//! partitions and concurrent edits): a regression in merging or conflict handling that loses
//! a write or leaves folders apart fails here. The large runs are in the README.

use std::time::Duration;

use meshsync_simulations::sim::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_meshes_under_partitions_lose_no_write_and_converge() {
    for seed in 1..=3 {
        let report = run(Options {
            nodes: 3,
            seed,
            events: 14,
            converge_within: Duration::from_secs(60),
            faults: true,
        })
        .await
        .unwrap();
        assert!(
            report.failures.is_empty(),
            "seed {seed}: {:#?}\nreplay: cargo run -p meshsync-simulations --bin meshsync-sim -- --nodes 3 --seed {seed} --events 14",
            report.failures
        );
        assert!(
            report.writes > 0 && report.convergence.is_some(),
            "{report:?}"
        );
    }
}
