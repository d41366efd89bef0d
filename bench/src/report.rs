//! A scenario's results: the figures of every target side by side with Herald/peer ratios, printed
//! as a text table, written as JSON, and as markdown for the summary of a whole run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::procfs::Machine;
use crate::targets::TargetKind;

/// What a figure counts, for formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// A plain count.
    Count,
    /// Events per second.
    PerSec,
    /// Bytes.
    Bytes,
    /// Percent of one CPU core.
    Percent,
    /// Microseconds (shown as milliseconds).
    Micros,
    /// Seconds (shown as milliseconds below 10 s).
    Seconds,
}

/// Which way is better, to read ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// More is better (rates).
    Higher,
    /// Less is better (memory, latency, time).
    Lower,
    /// Context, not a score (counts, CPU).
    Neither,
}

/// One figure of one target.
#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    /// Stable key (JSON).
    pub key: String,
    /// Row label (tables).
    pub label: String,
    /// Unit.
    pub unit: Unit,
    /// Direction.
    pub better: Better,
    /// The value; `None` when it could not be measured (e.g. timed out).
    pub value: Option<f64>,
}

impl Measure {
    /// A figure.
    pub fn new(
        key: impl Into<String>,
        label: impl Into<String>,
        unit: Unit,
        better: Better,
        value: Option<f64>,
    ) -> Self {
        Measure { key: key.into(), label: label.into(), unit, better, value }
    }
}

/// One row of the table: a figure for every target, and Herald's ratio to each peer.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Stable key.
    pub key: String,
    /// Label.
    pub label: String,
    /// Unit.
    pub unit: Unit,
    /// Direction.
    pub better: Better,
    /// Target name → value.
    pub values: BTreeMap<String, Option<f64>>,
    /// `herald/<peer>` → Herald's value divided by the peer's.
    pub ratios: BTreeMap<String, Option<f64>>,
}

/// The outcome of one scenario on every target.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// What was measured, in one line.
    pub title: String,
    /// Where.
    pub machine: Machine,
    /// The sizes and settings used.
    pub params: serde_json::Value,
    /// Targets in table order.
    pub targets: Vec<String>,
    /// Per target: the scenario's detailed result (or its error).
    pub results: BTreeMap<String, serde_json::Value>,
    /// The table.
    pub figures: Vec<Row>,
    /// Remarks worth reading next to the numbers.
    pub notes: Vec<String>,
    /// Whether every target ran without error.
    pub ok: bool,
}

impl Report {
    /// An empty report.
    pub fn new(scenario: &str, title: impl Into<String>, params: impl Serialize) -> Report {
        Report {
            scenario: scenario.to_string(),
            title: title.into(),
            machine: Machine::read(),
            params: serde_json::to_value(params).unwrap_or_default(),
            targets: Vec::new(),
            results: BTreeMap::new(),
            figures: Vec::new(),
            notes: Vec::new(),
            ok: true,
        }
    }

    /// Adds a target's detailed result and its figures.
    pub fn add(&mut self, target: TargetKind, details: impl Serialize, measures: Vec<Measure>) {
        let name = target.name().to_string();
        if !self.targets.contains(&name) {
            self.targets.push(name.clone());
        }
        self.results.insert(name.clone(), serde_json::to_value(details).unwrap_or_default());
        for measure in measures {
            let row = match self.figures.iter_mut().position(|row| row.key == measure.key) {
                Some(at) => &mut self.figures[at],
                None => {
                    self.figures.push(Row {
                        key: measure.key.clone(),
                        label: measure.label.clone(),
                        unit: measure.unit,
                        better: measure.better,
                        values: BTreeMap::new(),
                        ratios: BTreeMap::new(),
                    });
                    self.figures.last_mut().expect("just pushed")
                }
            };
            row.values.insert(name.clone(), measure.value);
        }
        self.compute_ratios();
    }

    /// Records that `target` failed.
    pub fn add_error(&mut self, target: TargetKind, error: &anyhow::Error) {
        let name = target.name().to_string();
        if !self.targets.contains(&name) {
            self.targets.push(name.clone());
        }
        self.results.insert(name.clone(), serde_json::json!({ "error": format!("{error:#}") }));
        self.notes.push(format!("{name} failed: {error:#}"));
        self.ok = false;
    }

    /// Adds a remark.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn peers(&self) -> Vec<&String> {
        self.targets.iter().filter(|name| name.as_str() != TargetKind::Herald.name()).collect()
    }

    fn compute_ratios(&mut self) {
        let herald = TargetKind::Herald.name();
        let peers: Vec<String> = self.peers().into_iter().cloned().collect();
        for row in &mut self.figures {
            row.ratios.clear();
            if !self.targets.iter().any(|t| t == herald) {
                continue;
            }
            let mine = row.values.get(herald).copied().flatten();
            for peer in &peers {
                let theirs = row.values.get(peer).copied().flatten();
                let ratio = match (mine, theirs) {
                    (Some(mine), Some(theirs)) if theirs != 0.0 => Some(mine / theirs),
                    _ => None,
                };
                row.ratios.insert(format!("{herald}/{peer}"), ratio);
            }
        }
    }

    /// The header and cells of the table.
    fn grid(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let ratio_names: Vec<String> =
            self.figures.first().map(|row| row.ratios.keys().cloned().collect()).unwrap_or_default();
        let mut header = vec!["figure".to_string()];
        header.extend(self.targets.iter().cloned());
        header.extend(ratio_names.iter().cloned());
        let rows = self
            .figures
            .iter()
            .map(|row| {
                let mut cells = vec![format!("{}{}", row.label, arrow(row.better))];
                cells.extend(self.targets.iter().map(|t| format_value(row.values.get(t).copied().flatten(), row.unit)));
                cells.extend(
                    ratio_names
                        .iter()
                        .map(|r| row.ratios.get(r).copied().flatten().map_or("–".into(), |x| format!("{x:.2}"))),
                );
                cells
            })
            .collect();
        (header, rows)
    }

    /// The table as aligned text, with the title and notes.
    pub fn render_text(&self) -> String {
        let (header, rows) = self.grid();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
                let pad = width - cell.chars().count();
                if i == 0 {
                    let _ = write!(out, "{cell}{}", " ".repeat(pad));
                } else {
                    let _ = write!(out, "  {}{cell}", " ".repeat(pad));
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let mut out = format!("== {}: {}\n", self.scenario, self.title);
        out.push_str(&line(&header));
        for row in &rows {
            out.push_str(&line(row));
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }

    /// The table as markdown, with the title and notes.
    pub fn render_markdown(&self) -> String {
        let (header, rows) = self.grid();
        let mut out = format!("### {}\n\n{}\n\n", self.scenario, self.title);
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let _ = writeln!(out, "|{}", " --- |".repeat(header.len()));
        for row in rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }

    /// Writes the report as JSON to `path`, creating its directory.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").with_context(|| format!("write {}", path.display()))
    }
}

fn arrow(better: Better) -> &'static str {
    match better {
        Better::Higher => " ↑",
        Better::Lower => " ↓",
        Better::Neither => "",
    }
}

/// A value in its unit, compact.
pub fn format_value(value: Option<f64>, unit: Unit) -> String {
    let Some(value) = value else { return "–".to_string() };
    match unit {
        Unit::Count => format!("{}", value.round() as i64),
        Unit::PerSec => format!("{}/s", si(value)),
        Unit::Bytes => bytes(value),
        Unit::Percent => format!("{value:.0}%"),
        Unit::Micros => format!("{:.2} ms", value / 1000.0),
        Unit::Seconds if value < 10.0 => format!("{:.0} ms", value * 1000.0),
        Unit::Seconds => format!("{value:.1} s"),
    }
}

fn si(value: f64) -> String {
    match value.abs() {
        v if v >= 1e6 => format!("{:.2}M", value / 1e6),
        v if v >= 1e3 => format!("{:.1}k", value / 1e3),
        _ => format!("{value:.0}"),
    }
}

fn bytes(value: f64) -> String {
    match value.abs() {
        v if v >= (1u64 << 30) as f64 => format!("{:.2} GiB", value / (1u64 << 30) as f64),
        v if v >= (1u64 << 20) as f64 => format!("{:.1} MiB", value / (1u64 << 20) as f64),
        v if v >= 1024.0 => format!("{:.1} KiB", value / 1024.0),
        _ => format!("{value:.0} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_line_up_targets_and_ratios() {
        let mut report = Report::new("idle", "idle connections", serde_json::json!({"connections": 10}));
        let measure = |v| vec![Measure::new("bpc", "bytes/conn", Unit::Bytes, Better::Lower, Some(v))];
        report.add(TargetKind::Herald, serde_json::json!({"connected": 10}), measure(4096.0));
        report.add(TargetKind::NatsWs, serde_json::json!({}), measure(2048.0));
        report.add(TargetKind::Raw, serde_json::json!({}), vec![]);
        let row = &report.figures[0];
        assert_eq!(row.ratios["herald/nats-ws"], Some(2.0));
        assert_eq!(row.ratios["herald/raw"], None);
        let text = report.render_text();
        assert!(text.contains("4.0 KiB"), "{text}");
        assert!(text.contains("2.00"), "{text}");
        assert!(report.render_markdown().contains("| bytes/conn ↓ | 4.0 KiB | 2.0 KiB | – | 2.00 | – |"));
    }

    #[test]
    fn formats_units() {
        assert_eq!(format_value(Some(1_234_567.0), Unit::PerSec), "1.23M/s");
        assert_eq!(format_value(Some(1500.0), Unit::Micros), "1.50 ms");
        assert_eq!(format_value(Some(0.25), Unit::Seconds), "250 ms");
        assert_eq!(format_value(None, Unit::Count), "–");
    }
}
