//! Graph and memory-pool identifiers.

/// A captured graph, unique within its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct GraphId(pub u64);

/// A private memory pool id, PyTorch's `MempoolId_t`: a pair of unsigned 64-bit values.
/// `(0, 0)` means "let the backend create a fresh pool".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize)]
pub struct MempoolId(pub u64, pub u64);

impl MempoolId {
    pub const NONE: MempoolId = MempoolId(0, 0);
    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }
}
