//! vshmctl: watch and administer a running vshmd from the host.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;
use vshm_backend::control::{request, ControlError, ControlRequest};

/// vshm host monitor.
#[derive(Debug, Parser)]
#[command(name = "vshmctl", version)]
struct Args {
    /// vshmd's control socket (default: $VSHM_CONTROL, else /tmp/vshm.sock.ctl).
    #[arg(
        long,
        value_name = "PATH",
        env = "VSHM_CONTROL",
        default_value = "/tmp/vshm.sock.ctl"
    )]
    control: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Region, peers and sections.
    Status {
        /// Print the JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Delete a section as the host (its name goes now, its memory at the last close).
    Delete {
        /// Section name.
        name: String,
    },
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_status(doc: &Value) {
    let r = &doc["region"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    println!(
        "region  {} total, heap {} used / {} free (largest free {}, {} extents), {} resident",
        human(n(&r["size"])),
        human(n(&r["used"])),
        human(n(&r["free"])),
        human(n(&r["largest_free"])),
        n(&r["free_extents"]),
        human(n(&r["resident"])),
    );
    println!("\nPEER  CONNECTED  PID      HANDLES");
    for p in doc["peers"].as_array().into_iter().flatten() {
        println!(
            "{:<5} {:<10} {:<8} {}",
            n(&p["id"]),
            if p["connected"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            p["pid"].as_u64().map_or("-".to_string(), |v| v.to_string()),
            n(&p["handles"]),
        );
    }
    println!(
        "\nNAME                             SIZE        MAX         REFS  PERSISTENT  BY PEER"
    );
    for s in doc["sections"].as_array().into_iter().flatten() {
        let mut name = s["name"].as_str().unwrap_or("<unnamed>").to_string();
        if s["deleted"].as_bool().unwrap_or(false) {
            name.push_str(" (deleted)");
        }
        let by_peer: Vec<String> = s["refs_by_peer"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|pair| format!("{}:{}", n(&pair[0]), n(&pair[1])))
            .collect();
        println!(
            "{:<32} {:<11} {:<11} {:<5} {:<11} {}",
            name,
            human(n(&s["size"])),
            human(n(&s["max_size"])),
            n(&s["refs"]),
            if s["persistent"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            by_peer.join(" "),
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result: Result<(), ControlError> = match &args.command {
        Command::Status { json } => request(&args.control, &ControlRequest::Status).map(|doc| {
            if *json {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                print_status(&doc);
            }
        }),
        Command::Delete { name } => request(
            &args.control,
            &ControlRequest::Delete { name: name.clone() },
        )
        .map(|_| println!("deleted {name}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vshmctl: {e}");
            ExitCode::FAILURE
        }
    }
}
