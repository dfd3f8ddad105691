//! A few small seeded runs of `meshsync-sim` (four real devices, short schedules of
//! partitions (one bridged only by a storage peer), concurrent edits, deletes and renames (some
//! racing an edit on the other side: the edit must survive), a crash while a large file travels and a
//! restart, a device joining and one removed): a regression in merging, conflict handling,
//! recovery or removal that loses a write or leaves folders apart fails here. The large runs
//! are in the README.

use std::time::Duration;

use meshsync_simulations::sim::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_meshes_under_faults_lose_no_write_and_converge() {
    let (mut crashes, mut joins, mut removals, mut bridged) = (0, 0, 0, 0);
    for seed in [1, 3, 9] {
        let report = run(Options {
            nodes: 4,
            seed,
            events: 24,
            converge_within: Duration::from_secs(60),
            faults: true,
            storage: true,
            bad_links: true,
            versus_edits: true,
        })
        .await
        .unwrap();
        assert!(
            report.failures.is_empty(),
            "seed {seed}: {:#?}\nreplay: cargo run -p meshsync-simulations --bin meshsync-sim -- --nodes 4 --seed {seed} --events 24",
            report.failures
        );
        assert!(
            report.writes > 0 && report.convergence.is_some(),
            "{report:?}"
        );
        crashes += report.crashes;
        joins += report.joins;
        removals += report.removals;
        bridged += report.bridged;
    }
    // The schedules of these seeds hold every kind of fault.
    assert!(
        crashes > 0 && joins > 0 && removals > 0 && bridged > 0,
        "{crashes} {joins} {removals} {bridged}"
    );
}
