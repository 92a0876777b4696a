//! Greedy batched decode of the shipped model alone, for profiling one path:
//! `cargo run --release -p itera-core --example batched_decode -- 64` (streams; default 64),
//! e.g. under `perf record`. Prints tokens/s (median of 5 runs of 200 steps).

fn main() {
    let path = itera_core::format::model_dir::default_model_path();
    let g = match itera_core::Generator::load(&path) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let streams: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 64,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("error: the argument is a positive number of streams");
            std::process::exit(2);
        }
    };
    match itera_core::bench::batched_decode_tokens_per_s(&g.runtime, streams, 200, 5) {
        Ok(r) => println!("{streams} streams: {r:.0} tokens/s"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
