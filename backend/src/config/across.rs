//! Checks between the regions of one file: each region alone may be fine, but two regions
//! (or one region's sockets) must not share a name, a socket path or a metrics address.
//! Every conflict names both settings and where each came from.

use std::net::SocketAddr;

use super::{ConfigError, Resolved};

/// Refuses names, paths and metrics addresses used twice, within a region or across them.
pub(super) fn check(regions: &[Resolved]) -> Result<(), ConfigError> {
    let names: Vec<(&String, &String)> =
        regions.iter().map(|r| (&r.name, &r.name_origin)).collect();
    first_pair(&names, "two regions cannot share a name")?;
    let paths: Vec<_> = regions
        .iter()
        .flat_map(|r| r.paths.iter().map(|(p, d)| (p, d)))
        .collect();
    first_pair(&paths, "two sockets cannot share a path")?;
    // Port 0 asks the kernel for a free port: never the same one twice.
    let metrics: Vec<(&SocketAddr, &String)> = regions
        .iter()
        .filter_map(|r| r.metrics.as_ref())
        .filter(|(a, _)| a.port() != 0)
        .map(|(a, d)| (a, d))
        .collect();
    first_pair(&metrics, "two metrics listeners cannot share an address")
}

/// The first value given twice, as a conflict between its two descriptions.
fn first_pair<T: PartialEq>(list: &[(&T, &String)], problem: &str) -> Result<(), ConfigError> {
    for (i, (a, first)) in list.iter().enumerate() {
        if let Some((_, second)) = list[i + 1..].iter().find(|(b, _)| b == a) {
            return Err(ConfigError::Conflict {
                first: (*first).clone(),
                second: (*second).clone(),
                problem: problem.into(),
            });
        }
    }
    Ok(())
}
