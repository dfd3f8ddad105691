//! Timing the phases of a piece of work (a materialise, an admit, a state commit) for the debug
//! log.

/// How long each phase of a piece of work took, for its debug log line.
pub(crate) struct Phases {
    last: std::time::Instant,
    each: Vec<(&'static str, std::time::Duration)>,
}

impl Default for Phases {
    fn default() -> Phases {
        Phases {
            last: std::time::Instant::now(),
            each: Vec::new(),
        }
    }
}

impl Phases {
    /// Ends the phase `phase` now (it began where the last one ended).
    pub(crate) fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.each.push((phase, now - self.last));
        self.last = now;
    }

    /// The phases' time so far.
    pub(crate) fn total(&self) -> std::time::Duration {
        self.each.iter().map(|(_, took)| *took).sum()
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, took)) in self.each.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{phase} {:.1} ms", took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}
