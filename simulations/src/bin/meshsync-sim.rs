//! `meshsync-sim --nodes N --seed S`: real devices in one process under a seeded schedule of
//! partitions and concurrent edits (see `meshsync_simulations::sim`). Exits 0 only if every
//! check holds; a failing run prints how to replay it. `--sizes 3,10,30,50` runs each size and
//! prints a CSV table (also written to `--csv FILE`).

use std::time::Duration;

use clap::Parser;
use meshsync_simulations::sim::{self, Options, Report};

#[derive(Parser)]
#[command(about = "Many real meshsync devices under partitions and concurrent edits")]
struct Args {
    /// Devices in the mesh.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Seed of the schedule (the same seed replays the same events).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Events in the schedule.
    #[arg(long, default_value_t = 30)]
    events: usize,
    /// Seconds the mesh may take to converge after the last heal.
    #[arg(long, default_value_t = 120)]
    converge_secs: u64,
    /// Run these sizes one after another instead of --nodes (e.g. 3,10,30,50).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Partitions and edits only: no crashes and restarts, joins or removals.
    #[arg(long)]
    no_faults: bool,
    /// Every fourth device on slow, lossy links (4 MiB/s; one write in 5,000 breaks the
    /// connection).
    #[arg(long)]
    bad_links: bool,
    /// Some concurrent edits become a delete or rename on one side while the other edits.
    #[arg(long)]
    versus_edits: bool,
    /// Also write the CSV table here.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Draw convergence time and bytes per node against the number of nodes (SVG).
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let sizes = if args.sizes.is_empty() {
        vec![args.nodes]
    } else {
        args.sizes.clone()
    };
    let mut table = vec![Report::CSV_HEADER.to_string()];
    let mut failed = false;
    let mut reports = Vec::new();
    for nodes in sizes {
        let options = Options {
            nodes,
            seed: args.seed,
            events: args.events,
            converge_within: Duration::from_secs(args.converge_secs),
            faults: !args.no_faults,
            storage: !args.no_faults,
            bad_links: args.bad_links,
            versus_edits: args.versus_edits,
        };
        let report = sim::run(options).await?;
        println!(
            "{nodes} nodes, seed {}: {} writes, {} partitions, {} crashes, {} joins, {} removals, \
             converged in {}, {:.1} KiB in per node, peak RSS {} MiB",
            report.seed,
            report.writes,
            report.partitions,
            report.crashes,
            report.joins,
            report.removals,
            report
                .convergence
                .map_or("never".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
            report.bytes_in.iter().sum::<u64>() as f64 / 1024.0 / nodes as f64,
            report.peak_rss >> 20,
        );
        for failure in &report.failures {
            println!("  FAILED: {failure}");
        }
        if !report.failures.is_empty() {
            failed = true;
            println!(
                "  replay: cargo run --release -p meshsync-simulations --bin meshsync-sim -- \
                 --nodes {nodes} --seed {} --events {}{}{}{}",
                args.seed,
                args.events,
                if args.no_faults { " --no-faults" } else { "" },
                if args.bad_links { " --bad-links" } else { "" },
                if args.versus_edits {
                    " --versus-edits"
                } else {
                    ""
                },
            );
        }
        table.push(report.csv());
        reports.push(report);
    }
    let csv = table.join("\n") + "\n";
    print!("{csv}");
    if let Some(path) = &args.csv {
        std::fs::write(path, &csv)?;
    }
    if let Some(path) = &args.plot {
        meshsync_simulations::plot::scaling(&reports, path)?;
        println!("plot: {}", path.display());
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
