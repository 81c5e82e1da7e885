//! `xlb-rss-sim`: the many-worker simulation (`xlb_bench::rss`): flows replayed through N
//! engines behind a NIC's Toeplitz RSS (Microsoft key, 128-entry round-robin indirection
//! table), both directions, uniform and Zipf frame mixes. Prints one Markdown table (or
//! `--json`): the share of frames handed off between workers and the spread of the
//! workers' load. Deterministic (seeded); no root, no network.

use std::process::ExitCode;

use xlb_bench::rss::{simulate, Mix, SimConfig, SimReport};

const USAGE: &str = "usage: xlb-rss-sim [options]
  --workers 2,4,8,16      worker (= queue) counts (default 1,2,4,8,16)
  --flows 1000,10000,100000,1000000   flow counts (default those)
  --frames N              client frames per simulation, each answered (default 1000000)
  --mix uniform,zipf      frame mixes (zipf: exponent 1.0) (default both)
  --seed N                (default 1)
  --json                  JSON lines instead of the table";

#[derive(Debug)]
struct Args {
    workers: Vec<u16>,
    flows: Vec<u32>,
    frames: u64,
    mixes: Vec<Mix>,
    seed: u64,
    json: bool,
}

fn list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| format!("{flag}: bad item {x:?}"))
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        workers: vec![1, 2, 4, 8, 16],
        flows: vec![1_000, 10_000, 100_000, 1_000_000],
        frames: 1_000_000,
        mixes: vec![Mix::Uniform, Mix::Zipf(1.0)],
        seed: 1,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--json" => {
                a.json = true;
                continue;
            }
            _ => {}
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--workers" => a.workers = list(&flag, &val)?,
            "--flows" => a.flows = list(&flag, &val)?,
            "--frames" => a.frames = val.parse().map_err(|_| format!("--frames {val}"))?,
            "--seed" => a.seed = val.parse().map_err(|_| format!("--seed {val}"))?,
            "--mix" => {
                a.mixes = val
                    .split(',')
                    .map(|m| match m {
                        "uniform" => Ok(Mix::Uniform),
                        "zipf" => Ok(Mix::Zipf(1.0)),
                        _ => Err(format!("--mix {m}: uniform or zipf")),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if a.workers.iter().any(|&w| w == 0 || w > 64) {
        return Err("--workers: 1..64".into());
    }
    if a.flows.iter().any(|&f| f == 0 || f > 4_000_000) {
        return Err("--flows: 1..4000000".into());
    }
    if a.frames == 0 || a.frames > 100_000_000 {
        return Err("--frames: 1..100000000".into());
    }
    Ok(a)
}

fn json(r: &SimReport) -> String {
    let nums = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    format!(
        "{{\"workers\":{},\"flows\":{},\"mix\":\"{}\",\"frames\":{},\"handed_off_forward\":{},\
         \"handed_off_reply\":{},\"handed_off_share\":{:.4},\"processed_spread\":{:.4},\
         \"received_spread\":{:.4},\"flows_spread\":{:.4},\"processed\":[{}],\"received\":[{}],\
         \"dropped\":{}}}",
        r.workers,
        r.flows,
        r.mix,
        r.frames,
        r.handed_off_forward,
        r.handed_off_reply,
        r.handed_off_share(),
        r.processed_spread(),
        r.received_spread(),
        r.flows_spread(),
        nums(&r.processed),
        nums(&r.received),
        r.dropped
    )
}

fn run(a: Args) -> Result<(), String> {
    if !a.json {
        println!(
            "| workers | flows | frame mix | frames | handed off (client → VIP / reply / all) | \
             busiest worker ÷ mean: processed | received | flows held |"
        );
        println!("|---|---|---|---|---|---|---|---|");
    }
    for &flows in &a.flows {
        for &mix in &a.mixes {
            for &workers in &a.workers {
                let r = simulate(&SimConfig {
                    workers,
                    flows,
                    frames: a.frames,
                    mix,
                    seed: a.seed,
                    indirection_entries: 128,
                });
                if r.dropped > 0 {
                    return Err(format!(
                        "{} frames dropped by the engines: {r:?}",
                        r.dropped
                    ));
                }
                if a.json {
                    println!("{}", json(&r));
                } else {
                    let half = (r.frames / 2).max(1) as f64;
                    println!(
                        "| {workers} | {flows} | {} | {} | {:.1} % / {:.1} % / **{:.1} %** | {:.2} | {:.2} | {:.2} |",
                        r.mix,
                        r.frames,
                        100.0 * r.handed_off_forward as f64 / half,
                        100.0 * r.handed_off_reply as f64 / half,
                        100.0 * r.handed_off_share(),
                        r.processed_spread(),
                        r.received_spread(),
                        r.flows_spread(),
                    );
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    xlb_bench::cli::tool_main("xlb-rss-sim", USAGE, parse_args, run)
}
