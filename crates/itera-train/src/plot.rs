//! PNG charts with `plotters` (bitmap backend, the DejaVu Sans font embedded through the `dejavu`
//! crate, so nothing has to be installed): loss curves (`loss.png` of every run), bar charts
//! (per-tensor bit allocations of a mixed-precision plan) and grouped bars (expert load per MoE
//! layer). Each is rendered in memory and written atomically.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};

const W: u32 = 800;
const H: u32 = 500;
const FONT: &str = "sans-serif";

/// One line of a plot: legend name, RGB colour, (x, y) points.
pub type Series<'a> = (&'a str, [u8; 3], Vec<(f64, f64)>);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font always parses; without it text would silently be missing.
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| ())
            .expect("the embedded DejaVu Sans font parses");
    });
}

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// Renders into an RGB buffer with `draw`, then writes it as a PNG (atomically).
fn render(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| Error::file(path, e))?;
        draw(&root)?;
        root.present().map_err(|e| Error::file(path, e))?;
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W, H);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| Error::file(path, e))?;
        writer
            .write_image_data(&buf)
            .map_err(|e| Error::file(path, e))?;
    }
    itera_core::format::write_atomic(path, &bytes)?;
    Ok(())
}

/// Line plot of the series against x (`x_label`, `y_label` name the axes).
pub fn plot_lines(path: &Path, series: &[Series], x_label: &str, y_label: &str) -> Result<()> {
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.2.iter())
            .filter(|p| p.1.is_finite())
    };
    let x_max = pts().map(|p| p.0).fold(1.0f64, f64::max);
    let (mut y_min, mut y_max) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    render(path, |root| {
        let err = |e: &dyn std::fmt::Display| Error::file(path, e);
        let mut chart = ChartBuilder::on(root)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style((FONT, 14))
            .draw()
            .map_err(|e| err(&e))?;
        for (name, colour, points) in series {
            let c = rgb(*colour);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))
    })
}

/// Training and validation loss against step (`loss.png`).
pub fn plot_losses(path: &Path, series: &[Series]) -> Result<()> {
    plot_lines(path, series, "step", "loss")
}

/// A bar chart: one bar per item (value, colour) in order, a legend of the colours, and the
/// axis labels. Used for per-tensor bit allocations.
pub fn plot_bars(
    path: &Path,
    bars: &[(f64, [u8; 3])],
    legend: &[(&str, [u8; 3])],
    y_label: &str,
    x_label: &str,
) -> Result<()> {
    let y_max = bars.iter().map(|b| b.0).fold(1.0f64, f64::max) * 1.1;
    let n = bars.len().max(1) as f64;
    render(path, |root| {
        let err = |e: &dyn std::fmt::Display| Error::file(path, e);
        let mut chart = ChartBuilder::on(root)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n, 0f64..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style((FONT, 14))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, &(v, c))| {
                let x = i as f64;
                Rectangle::new([(x + 0.15, 0.0), (x + 0.85, v)], rgb(c).filled())
            }))
            .map_err(|e| err(&e))?;
        for (name, colour) in legend {
            let c = rgb(*colour);
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
                .map_err(|e| err(&e))?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.filled()));
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both charts write a PNG of the stated size with more than one colour in it (the lines,
    /// bars and text were drawn).
    #[test]
    fn charts_are_written_as_png() {
        let dir = std::env::temp_dir().join(format!("itera-plot-{}", std::process::id()));
        let lines = dir.join("a/loss.png");
        let train: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 5.0 / (1.0 + i as f64)))
            .collect();
        plot_losses(&lines, &[("train", [31, 119, 180], train)]).unwrap();
        let bars = dir.join("bars.png");
        plot_bars(
            &bars,
            &[(8.5, [40, 100, 200]), (4.5, [220, 80, 40])],
            &[("q8_0", [40, 100, 200]), ("q4_0", [220, 80, 40])],
            "bits per weight",
            "tensors",
        )
        .unwrap();
        for p in [lines, bars] {
            let bytes = std::fs::read(&p).unwrap();
            let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
            let mut reader = decoder.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert_eq!((info.width, info.height), (W, H));
            let distinct: std::collections::BTreeSet<&[u8]> = buf.chunks(3).collect();
            assert!(
                distinct.len() > 10,
                "{}: {} colours",
                p.display(),
                distinct.len()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
