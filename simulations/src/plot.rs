//! The scaling plot of `meshsync-sim --sizes … --plot FILE.svg`: convergence time after the
//! last heal, and bytes received per node, against the number of nodes.

use std::path::Path;

use plotters::prelude::*;

use crate::sim::Report;

/// Draws the two panels for `reports` (one per size) into an SVG file at `path`.
pub fn scaling(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let nodes = |r: &Report| r.nodes as f64;
    let seconds: Vec<(f64, f64)> = reports
        .iter()
        .filter_map(|r| Some((nodes(r), r.convergence?.as_secs_f64())))
        .collect();
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let mib: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| (nodes(r), mean(&r.bytes_in) / (1 << 20) as f64))
        .collect();
    panel(
        &left,
        "convergence after the last heal",
        "seconds",
        &seconds,
    )?;
    panel(&right, "received per node (whole run)", "MiB", &mib)?;
    root.present()?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    points: &[(f64, f64)],
) -> anyhow::Result<()> {
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let y_max = points.iter().map(|p| p.1).fold(0.001, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart.configure_mesh().x_desc("nodes").y_desc(unit).draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
    Ok(())
}
