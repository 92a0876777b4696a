//! loss.png: training and validation loss against step, drawn directly into a PNG (axes, ticks,
//! labels in a built-in 5x7 font) so no font or plotting stack has to be installed.

use std::path::Path;

use crate::error::{Error, Result};

const W: usize = 800;
const H: usize = 500;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 20;
const BOTTOM: usize = 50;

struct Canvas {
    px: Vec<[u8; 3]>,
}

fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [30, 1, 1, 14, 1, 1, 30],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'd' => [1, 1, 13, 19, 17, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'k' => [16, 16, 18, 20, 24, 20, 18],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 15, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        'b' => [16, 16, 22, 25, 17, 17, 30],
        'f' => [6, 9, 8, 28, 8, 8, 8],
        'q' => [0, 0, 13, 19, 15, 1, 1],
        'y' => [0, 0, 17, 17, 15, 1, 14],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        'w' => [0, 0, 17, 17, 21, 21, 10],
        'g' => [0, 0, 15, 17, 15, 1, 14],
        'h' => [16, 16, 22, 25, 17, 17, 17],
        'm' => [0, 0, 26, 21, 21, 17, 17],
        'u' => [0, 0, 17, 17, 17, 19, 13],
        'c' => [0, 0, 14, 16, 16, 17, 14],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        ' ' => [0; 7],
        _ => [0; 7],
    }
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![[255, 255, 255]; W * H],
        }
    }

    fn dot(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (
                (x0 + t * (x1 - x0)).round() as i64,
                (y0 + t * (y1 - y0)).round() as i64,
            );
            for dx in 0..thick {
                for dy in 0..thick {
                    self.dot(x + dx, y + dy, c);
                }
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (16 >> col) != 0 {
                        self.dot((x + i * 6 + col) as i64, (y + row) as i64, c);
                    }
                }
            }
        }
    }
}

fn tick_label(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{}k", (v / 1000.0).round())
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// One line of the plot: legend name, RGB colour, (step, loss) points.
pub type Series<'a> = (&'a str, [u8; 3], Vec<(f64, f64)>);

/// Draws the series and writes the PNG atomically.
pub fn plot_losses(path: &Path, series: &[Series]) -> Result<()> {
    let pts = series.iter().flat_map(|s| s.2.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x_max = x_max.max(x);
        if y.is_finite() {
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-6 {
        y_max = y_min + 1.0;
    }
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let to_px = |x: f64, y: f64| {
        (
            LEFT as f64 + x / x_max * pw,
            TOP as f64 + (y_max - y) / (y_max - y_min) * ph,
        )
    };
    let mut cv = Canvas::new();
    let (black, grey) = ([0, 0, 0], [220, 220, 220]);
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let y = TOP as f64 + f * ph;
        cv.line((LEFT as f64, y), (LEFT as f64 + pw, y), grey, 1);
        cv.text(
            4,
            y as usize - 3,
            &tick_label(y_max - f * (y_max - y_min)),
            black,
        );
        let x = LEFT as f64 + f * pw;
        cv.line((x, TOP as f64 + ph), (x, TOP as f64 + ph + 5.0), black, 1);
        let step = (f * x_max).round();
        let label = if step >= 10_000.0 {
            tick_label(step)
        } else {
            format!("{step:.0}")
        };
        cv.text(
            (x as usize).saturating_sub(label.len() * 3),
            H - BOTTOM + 10,
            &label,
            black,
        );
    }
    cv.line(
        (LEFT as f64, TOP as f64),
        (LEFT as f64, TOP as f64 + ph),
        black,
        1,
    );
    cv.line(
        (LEFT as f64, TOP as f64 + ph),
        (LEFT as f64 + pw, TOP as f64 + ph),
        black,
        1,
    );
    cv.text(W / 2 - 12, H - 18, "step", black);
    cv.text(4, 4, "loss", black);
    for (k, (name, colour, points)) in series.iter().enumerate() {
        for w in points.windows(2) {
            cv.line(to_px(w[0].0, w[0].1), to_px(w[1].0, w[1].1), *colour, 2);
        }
        if points.len() == 1 {
            let (x, y) = to_px(points[0].0, points[0].1);
            cv.line((x - 2.0, y), (x + 2.0, y), *colour, 3);
        }
        let ly = TOP + 10 + k * 14;
        cv.line(
            ((W - 140) as f64, ly as f64 + 3.0),
            ((W - 115) as f64, ly as f64 + 3.0),
            *colour,
            3,
        );
        cv.text(W - 108, ly, name, black);
    }
    cv.save(path)
}

impl Canvas {
    fn save(&self, path: &Path) -> Result<()> {
        let cv = self;
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(|e| Error::file(path, e))?;
            let flat: Vec<u8> = cv.px.iter().flatten().copied().collect();
            writer
                .write_image_data(&flat)
                .map_err(|e| Error::file(path, e))?;
        }
        itera_core::checkpoint::write_atomic(path, &bytes)?;
        Ok(())
    }
}

/// A bar chart: one bar per item (value, colour) in order, a legend, and a y-axis label; written
/// atomically as PNG. Used for per-tensor bit allocations.
pub fn plot_bars(
    path: &Path,
    bars: &[(f64, [u8; 3])],
    legend: &[(&str, [u8; 3])],
    y_label: &str,
) -> Result<()> {
    let y_max = bars.iter().map(|b| b.0).fold(1.0f64, f64::max) * 1.1;
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let mut cv = Canvas::new();
    let (black, grey) = ([0, 0, 0], [220, 220, 220]);
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let y = TOP as f64 + f * ph;
        cv.line((LEFT as f64, y), (LEFT as f64 + pw, y), grey, 1);
        cv.text(4, y as usize - 3, &tick_label(y_max * (1.0 - f)), black);
    }
    let slot = pw / bars.len().max(1) as f64;
    for (i, &(v, colour)) in bars.iter().enumerate() {
        let x0 = LEFT as f64 + i as f64 * slot + slot * 0.15;
        let height = (v / y_max * ph).max(1.0);
        let top = TOP as f64 + ph - height;
        let x1 = (x0 + (slot * 0.7).max(1.0)).round() as i64;
        for x in x0.round() as i64..x1 {
            for y in top.round() as i64..(TOP as f64 + ph).round() as i64 {
                cv.dot(x, y, colour);
            }
        }
    }
    cv.line(
        (LEFT as f64, TOP as f64 + ph),
        (LEFT as f64 + pw, TOP as f64 + ph),
        black,
        1,
    );
    cv.line(
        (LEFT as f64, TOP as f64),
        (LEFT as f64, TOP as f64 + ph),
        black,
        1,
    );
    cv.text(4, 4, y_label, black);
    cv.text(
        W / 2 - 60,
        H - 18,
        "quantizable tensors in file order",
        black,
    );
    for (k, (name, colour)) in legend.iter().enumerate() {
        let ly = TOP + 10 + k * 14;
        cv.line(
            ((W - 140) as f64, ly as f64 + 3.0),
            ((W - 115) as f64, ly as f64 + 3.0),
            *colour,
            3,
        );
        cv.text(W - 108, ly, name, black);
    }
    cv.save(path)
}
