//! The in-memory twin: a sans-IO network model ([`MemoryNetwork`]) and the async adapter that
//! implements [`crate::Transport`] over it ([`MemoryHub`], [`MemoryTransport`]).

mod network;
mod transport;

pub use network::{
    DEFAULT_LINK_CAPACITY, Delivery, LinkConfig, MemoryNetwork, NetworkStats, SendOutcome,
};
pub(crate) use transport::MemoryResponder;
pub use transport::{MemoryHub, MemoryPeer, MemoryTransport};
