//! Percentiles and markdown tables, with an optional compare row per case.

use std::fmt::Write as _;

/// Nearest-rank percentile of an ascending slice; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50, p99 and max of some samples (sorted here).
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

pub fn summarise(samples: &mut [f64]) -> Summary {
    samples.sort_by(|a, b| a.total_cmp(b));
    Summary {
        n: samples.len(),
        p50: percentile(samples, 50.0),
        p99: percentile(samples, 99.0),
        max: samples.last().copied(),
    }
}

#[derive(Clone, Debug)]
pub enum Cell {
    /// A measured number and the decimals to show.
    Num(f64, usize),
    Text(String),
    /// Not measured, and why.
    Missing(String),
}

impl Cell {
    pub fn num(v: f64, decimals: usize) -> Cell {
        if v.is_finite() {
            Cell::Num(v, decimals)
        } else {
            Cell::Missing("not finite".into())
        }
    }
    pub fn opt(v: Option<f64>, decimals: usize, why: &str) -> Cell {
        match v {
            Some(v) => Cell::num(v, decimals),
            None => Cell::Missing(why.into()),
        }
    }
    pub fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }
    fn render(&self) -> String {
        match self {
            Cell::Num(v, d) => group_thousands(&format!("{v:.d$}")),
            Cell::Text(s) => s.replace('|', "\\|"),
            Cell::Missing(why) => format!("n/a ({why})"),
        }
    }
}

fn group_thousands(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map(|r| ("-", r)).unwrap_or(("", s));
    let (int, frac) = rest.split_once('.').map(|(i, f)| (i, Some(f))).unwrap_or((rest, None));
    if int.len() <= 4 {
        return s.to_string();
    }
    let mut out = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    /// Which server: `shopgraph` or the compare command.
    pub target: String,
    /// The variant measured, e.g. `postgres c16`.
    pub case: String,
    pub cells: Vec<Cell>,
}

#[derive(Clone, Debug)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(title: &str, columns: &[&str]) -> Table {
        Table {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn push(&mut self, target: &str, case: &str, cells: Vec<Cell>) {
        assert_eq!(cells.len(), self.columns.len(), "row width of {}", self.title);
        self.rows.push(Row { target: target.into(), case: case.into(), cells });
    }

    /// A row whose every cell is missing for the same reason.
    pub fn push_failed(&mut self, target: &str, case: &str, why: &str) {
        let why: String = why.chars().take(160).collect();
        let cells = self.columns.iter().map(|_| Cell::Missing(why.clone())).collect();
        self.rows.push(Row { target: target.into(), case: case.into(), cells });
    }

    /// Cells that should have been numbers but are missing (for `--smoke`).
    pub fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.rows {
            for (c, cell) in self.columns.iter().zip(&r.cells) {
                if let Cell::Missing(why) = cell {
                    out.push(format!("{} / {} / {}: {}", r.target, r.case, c, why));
                }
            }
        }
        out
    }

    /// Markdown. With two targets, each case gets a `ratio` row (second /
    /// first) under its two rows.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### {}\n", self.title);
        let targets: Vec<&str> = {
            let mut t: Vec<&str> = Vec::new();
            for r in &self.rows {
                if !t.contains(&r.target.as_str()) {
                    t.push(&r.target);
                }
            }
            t
        };
        let _ = write!(s, "| server | case |");
        for c in &self.columns {
            let _ = write!(s, " {c} |");
        }
        s.push('\n');
        s.push_str("| --- | --- |");
        for _ in &self.columns {
            s.push_str(" ---: |");
        }
        s.push('\n');
        let mut cases: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !cases.contains(&r.case.as_str()) {
                cases.push(&r.case);
            }
        }
        for case in cases {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.case == case).collect();
            for r in &rows {
                let _ = write!(s, "| {} | {} |", r.target, r.case);
                for c in &r.cells {
                    let _ = write!(s, " {} |", c.render());
                }
                s.push('\n');
            }
            if targets.len() == 2 {
                let a = rows.iter().find(|r| r.target == targets[0]);
                let b = rows.iter().find(|r| r.target == targets[1]);
                if let (Some(a), Some(b)) = (a, b) {
                    let _ = write!(s, "| ratio {}/{} | {} |", targets[1], targets[0], case);
                    for (x, y) in a.cells.iter().zip(&b.cells) {
                        match (x, y) {
                            (Cell::Num(x, _), Cell::Num(y, _)) if *x != 0.0 => {
                                let _ = write!(s, " {:.2}× |", y / x);
                            }
                            _ => s.push_str(" – |"),
                        }
                    }
                    s.push('\n');
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n{n}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands("1234"), "1234");
        assert_eq!(group_thousands("12345.6"), "12,345.6");
        assert_eq!(group_thousands("1000000"), "1,000,000");
        assert_eq!(group_thousands("-20000"), "-20,000");
    }

    #[test]
    fn a_compare_table_has_ratio_rows() {
        let mut t = Table::new("X", &["ops/s"]);
        t.push("a", "c1", vec![Cell::num(100.0, 0)]);
        t.push("b", "c1", vec![Cell::num(150.0, 0)]);
        let md = t.markdown();
        assert!(md.contains("| ratio b/a | c1 | 1.50× |"), "{md}");
    }
}
