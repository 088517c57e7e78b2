//! The server's query budget (`--max-queries`): how many images one client key may have
//! classified, counted across sessions in a small state file. Each image is counted before
//! it is computed, so a client that stops mid-image has still spent it; a client over its
//! budget is refused before the image starts. One server process per state file.
use crate::error::{Error, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The state file: images served per client key fingerprint.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    version: u32,
    clients: IndexMap<String, u64>,
}

/// One client's budget on this server.
#[derive(Clone, Debug)]
pub struct QueryBudget {
    pub path: PathBuf,
    /// Fingerprint of the client's pinned public key.
    pub client: String,
    pub max: u64,
}

impl QueryBudget {
    fn read(path: &Path) -> Result<State> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let s: State = serde_json::from_str(&text)
                    .map_err(|e| Error::parse(path, format!("not a query state file: {e}")))?;
                if s.version != 1 {
                    return Err(Error::parse(
                        path,
                        format!("state file version {} (expected 1)", s.version),
                    ));
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
                version: 1,
                clients: IndexMap::new(),
            }),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Images this client has had so far.
    pub fn used(&self) -> Result<u64> {
        Ok(Self::read(&self.path)?
            .clients
            .get(&self.client)
            .copied()
            .unwrap_or(0))
    }

    /// Counts one more image, or refuses it when the budget is spent.
    pub fn admit(&self) -> Result<u64> {
        let mut s = Self::read(&self.path)?;
        let n = s.clients.entry(self.client.clone()).or_insert(0);
        if *n >= self.max {
            return Err(Error::Refused {
                peer: format!("the client (key {})", self.client),
                msg: format!(
                    "its query budget is spent: {} of --max-queries {} images ({})",
                    n,
                    self.max,
                    self.path.display()
                ),
            });
        }
        *n += 1;
        let used = *n;
        let text = serde_json::to_string_pretty(&s).expect("a map of counts serialises");
        crate::fs::write_atomic(&self.path, text.as_bytes())?;
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_count_per_client_across_instances_and_refuse_when_spent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.json");
        let a = QueryBudget {
            path: path.clone(),
            client: "aa".into(),
            max: 2,
        };
        let b = QueryBudget {
            client: "bb".into(),
            ..a.clone()
        };
        assert_eq!(a.admit().unwrap(), 1);
        assert_eq!(b.admit().unwrap(), 1);
        // A later session (a new instance) continues the count.
        let a2 = a.clone();
        assert_eq!(a2.admit().unwrap(), 2);
        let e = a2.admit().unwrap_err().to_string();
        assert!(e.contains("budget is spent") && e.contains("aa"), "{e}");
        assert_eq!((a.used().unwrap(), b.used().unwrap()), (2, 1));
        std::fs::write(&path, "{").unwrap();
        let e = a.admit().unwrap_err().to_string();
        assert!(
            e.contains("q.json") && e.contains("not a query state file"),
            "{e}"
        );
    }
}
