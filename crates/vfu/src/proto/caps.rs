//! The `VERSION` capabilities JSON.

use serde::{Deserialize, Serialize};

use super::header::{DEFAULT_MAX_DATA_XFER, DEFAULT_MAX_MSG_FDS, ProtoError};

/// `VERSION` capabilities (the JSON object under `"capabilities"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    /// Most fds in one message.
    #[serde(default = "default_max_msg_fds")]
    pub max_msg_fds: u32,
    /// Most data bytes in one message.
    #[serde(default = "default_max_data_xfer")]
    pub max_data_xfer_size: u32,
    /// Supported page sizes (bitmap).
    #[serde(default = "default_pgsizes")]
    pub pgsizes: u64,
    /// Most DMA mappings.
    #[serde(default = "default_max_dma_maps")]
    pub max_dma_maps: u32,
    /// Migration capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCaps>,
}

/// Migration capabilities inside [`Caps`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCaps {
    /// Dirty-page granularity.
    pub pgsize: u64,
    /// Largest dirty bitmap.
    #[serde(default)]
    pub max_bitmap_size: u64,
}

fn default_max_msg_fds() -> u32 {
    DEFAULT_MAX_MSG_FDS
}
fn default_max_data_xfer() -> u32 {
    DEFAULT_MAX_DATA_XFER
}
fn default_pgsizes() -> u64 {
    4096
}
fn default_max_dma_maps() -> u32 {
    65535
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            max_msg_fds: default_max_msg_fds(),
            max_data_xfer_size: default_max_data_xfer(),
            pgsizes: default_pgsizes(),
            max_dma_maps: default_max_dma_maps(),
            migration: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CapsDoc {
    capabilities: Caps,
}

impl Caps {
    /// The VERSION payload after major/minor: NUL-terminated JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(&CapsDoc {
            capabilities: self.clone(),
        })
        .expect("plain struct serializes");
        v.push(0);
        v
    }

    /// Parse the JSON (with or without the terminating NUL; empty means defaults).
    pub fn from_json(data: &[u8]) -> Result<Caps, ProtoError> {
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        let s = &data[..end];
        if s.iter().all(u8::is_ascii_whitespace) {
            return Ok(Caps::default());
        }
        let doc: CapsDoc = serde_json::from_slice(s)
            .map_err(|e| ProtoError::Version(format!("bad capabilities JSON: {e}")))?;
        let c = doc.capabilities;
        // No minimum in the specification; libvfio-user's sample client says 1024.
        if c.max_data_xfer_size == 0 {
            return Err(ProtoError::Version("max_data_xfer_size 0".into()));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::*;

    fn msg(cmd: Command, payload: &[u8]) -> (Header, Vec<u8>) {
        (
            Header::command(7, cmd, HEADER_SIZE + payload.len()),
            payload.to_vec(),
        )
    }

    #[test]
    fn version_caps() {
        let caps = Caps {
            max_msg_fds: 8,
            max_data_xfer_size: 1 << 20,
            pgsizes: 4096,
            max_dma_maps: 100,
            migration: Some(MigrationCaps {
                pgsize: 4096,
                max_bitmap_size: 1 << 20,
            }),
        };
        let mut p = vec![0, 0, 1, 0];
        p.extend(caps.to_json());
        let (h, p) = msg(Command::Version, &p);
        let r = parse_request(&h, &p, 0, 1 << 20).unwrap();
        assert_eq!(
            r,
            Request::Version {
                major: 0,
                minor: 1,
                caps
            }
        );
        // Unknown keys are ignored; missing ones take the defaults.
        let c = Caps::from_json(br#"{"capabilities":{"twin_socket":{"supported":true}}}"#).unwrap();
        assert_eq!(c, Caps::default());
        assert!(Caps::from_json(b"{nope").is_err());
        assert!(Caps::from_json(br#"{"capabilities":{"max_data_xfer_size":0}}"#).is_err());
        assert_eq!(
            Caps::from_json(br#"{"capabilities":{"max_data_xfer_size":1024}}"#)
                .unwrap()
                .max_data_xfer_size,
            1024
        );
    }
}
